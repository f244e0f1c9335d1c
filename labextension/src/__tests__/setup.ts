import { configure } from '@testing-library/react';

// jest runs the suites side by side: on 2 busy cores a real HTTP + event-stream round trip to
// the test service can take more than the default 1 s that waitFor and findBy allow
configure({ asyncUtilTimeout: 5000 });
