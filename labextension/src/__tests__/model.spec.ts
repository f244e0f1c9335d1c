import { LogBuffer } from '../logbuffer';
import {
  ICustomNBImage,
  buildDurationSeconds,
  failureMessage,
  imageFromForm,
  EMPTY_FORM,
  mergeLogTail,
  packageErrorLine,
  parsePackageLines,
  phaseProgress
} from '../model';

const withStatus = (status: ICustomNBImage['status']): ICustomNBImage => ({
  metadata: { name: 'x' },
  spec: { buildType: 'PackageList' },
  status
});

describe('phaseProgress', () => {
  it.each([
    ['Pending', -1, 0, false, false],
    ['Prepare', 0, 0.125, false, false],
    ['Resolving', 1, 0.375, false, false],
    ['Building', 2, 0.625, false, false],
    ['Ready', 3, 1, false, true]
  ])('%s → step %d, fraction %d', (phase, step, fraction, failed, done) => {
    const p = phaseProgress(withStatus({ phase: phase as any }));
    expect([p.step, p.fraction, p.failed, p.done]).toEqual([step, fraction, failed, done]);
  });

  it('puts a failure at the last step that began', () => {
    const p = phaseProgress(
      withStatus({
        phase: 'Failed',
        phaseTimes: { Prepare: '2026-01-01T00:00:00Z', Resolving: '2026-01-01T00:00:05Z' }
      })
    );
    expect(p).toMatchObject({ step: 1, failed: true, done: true, label: 'Failed while resolving' });
  });

  it('shows the queue position while pending', () => {
    expect(phaseProgress(withStatus({ phase: 'Pending', queuePosition: 2 })).label).toBe(
      'Waiting for a build slot (#2)'
    );
  });
});

describe('packages textarea ↔ spec.packageVersions', () => {
  const text = 'pandas>=2\n\n# plotting\nmatplotlib  # for figures\nscikit-learn==1.5.*\n';

  it('skips blank and comment lines and remembers each entry’s line', () => {
    expect(parsePackageLines(text)).toEqual({
      packages: ['pandas>=2', 'matplotlib', 'scikit-learn==1.5.*'],
      lineOfPackage: [0, 3, 4]
    });
  });

  it('maps the field at fault to its line', () => {
    const lines = parsePackageLines(text);
    expect(packageErrorLine('spec.packageVersions[2]', lines)).toBe(4);
    expect(packageErrorLine('spec.packageVersions[1]', lines)).toBe(3);
    expect(packageErrorLine('spec.packageVersions[9]', lines)).toBeNull();
    expect(packageErrorLine('spec.baseImage', lines)).toBeNull();
    expect(packageErrorLine(undefined, lines)).toBeNull();
  });

  it('builds the object to POST from the form', () => {
    const obj = imageFromForm({
      ...EMPTY_FORM,
      displayName: ' My image ',
      baseImage: 'localhost:5000/nb:1',
      packagesText: text
    });
    expect(obj.metadata.annotations).toEqual({ 'opendatahub.io/notebook-image-name': 'My image' });
    expect(obj.metadata.name).toBeUndefined();
    expect(obj.spec).toEqual({
      buildType: 'PackageList',
      baseImage: 'localhost:5000/nb:1',
      packageVersions: ['pandas>=2', 'matplotlib', 'scikit-learn==1.5.*']
    });
    const imported = imageFromForm({ ...EMPTY_FORM, buildType: 'ImageImport', fromImage: 'q/i:1 ' });
    expect(imported.spec).toEqual({ buildType: 'ImageImport', fromImage: 'q/i:1' });
  });
});

describe('build duration and failure text', () => {
  it('measures from start to completion', () => {
    const image = withStatus({
      phase: 'Ready',
      startTime: '2026-01-01T00:00:00Z',
      completionTime: '2026-01-01T00:02:05Z'
    });
    expect(buildDurationSeconds(image)).toBe(125);
  });

  it('measures to now while running', () => {
    const image = withStatus({ phase: 'Building', phaseTimes: { Prepare: '2026-01-01T00:00:00Z' } });
    expect(buildDurationSeconds(image, Date.parse('2026-01-01T00:00:42Z'))).toBe(42);
  });

  it('quotes the failing condition', () => {
    const image = withStatus({
      phase: 'Failed',
      conditions: [
        { type: 'Prepared', status: 'True', message: 'base image pinned', lastTransitionTime: '2026-01-01T00:00:01Z' },
        {
          type: 'ErrorResolvingDependencies',
          status: 'True',
          message: 'No solution found: pandas==99 does not exist',
          lastTransitionTime: '2026-01-01T00:00:09Z'
        }
      ]
    });
    expect(failureMessage(image)).toBe('No solution found: pandas==99 does not exist');
    expect(failureMessage(withStatus({ phase: 'Ready' }))).toBeNull();
  });
});

describe('logs', () => {
  it('merges the fetched log with lines that arrived meanwhile, once', () => {
    expect(mergeLogTail(['a', 'b', 'c'], ['b', 'c', 'd'])).toEqual(['a', 'b', 'c', 'd']);
    expect(mergeLogTail(['a', 'b'], ['x'])).toEqual(['a', 'b', 'x']);
    expect(mergeLogTail([], ['x'])).toEqual(['x']);
    expect(mergeLogTail(['a'], [])).toEqual(['a']);
  });

  it('keeps at most maxLines, counting what it dropped', () => {
    const buffer = new LogBuffer(100);
    const generation = buffer.generation;
    for (let i = 0; i < 10000; i++) {
      buffer.append([`line ${i}`]);
    }
    expect(buffer.lines.length).toBeLessThanOrEqual(125);
    expect(buffer.lines.length).toBeGreaterThanOrEqual(100);
    expect(buffer.lines[buffer.lines.length - 1]).toBe('line 9999');
    expect(buffer.dropped + buffer.lines.length).toBe(10000);
    expect(buffer.generation).toBeGreaterThan(generation);
  });
});
