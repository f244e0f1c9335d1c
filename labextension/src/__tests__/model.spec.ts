import { LogBuffer } from '../logbuffer';
import {
  ICustomNBImage,
  IEnvironment,
  baseFailedMessage,
  buildDurationSeconds,
  buildFinishedNotice,
  checkPackageLines,
  durationLabel,
  editAsNewNotice,
  environmentIsEmpty,
  failureMessage,
  formFromEnvironment,
  changesLabel,
  credentialNameFor,
  formFromImage,
  formInputOf,
  formatBytes,
  formatDuration,
  imageFromForm,
  newerBuildOf,
  repositoryHost,
  imageSections,
  EMPTY_FORM,
  logSeparator,
  mayChange,
  mergeImages,
  mergeLogTail,
  packageErrorLine,
  packageErrorText,
  packageLineError,
  parsePackageLines,
  phaseProgress,
  runLabel,
  triggerLabel,
  sharedWithLabel,
  sortNewestFirst,
  startableBuild,
  upsertImage,
  withoutFieldPrefix
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

  it('places a rebuild’s failure by failedPhase, not by the last run’s phase times', () => {
    const stale = {
      Prepare: '2026-01-01T00:00:00Z',
      Resolving: '2026-01-01T00:00:05Z',
      Building: '2026-01-01T00:00:09Z'
    };
    const withFailedPhase = withStatus({ phase: 'Failed', failedPhase: 'Resolving', phaseTimes: stale });
    expect(phaseProgress(withFailedPhase)).toMatchObject({ phase: 'Failed', step: 1 });
    // without failedPhase: only the phase times of the current run count
    const rebuilt = withStatus({
      phase: 'Failed',
      startTime: '2026-01-02T00:00:00Z',
      phaseTimes: { ...stale, Prepare: '2026-01-02T00:00:01Z' }
    });
    expect(phaseProgress(rebuilt)).toMatchObject({ phase: 'Failed', step: 0, label: 'Failed while preparing' });
  });

  it('gives the badge’s phase with the bar’s position', () => {
    for (const phase of ['Pending', 'Prepare', 'Resolving', 'Building', 'Ready', 'Failed']) {
      expect(phaseProgress(withStatus({ phase: phase as any })).phase).toBe(phase);
    }
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
    // a schedule goes with builds; an import follows its tag without one
    const weekly = imageFromForm({ ...EMPTY_FORM, baseImage: 'b:1', packagesText: 'pandas>=2', rebuildSchedule: 'weekly' });
    expect(weekly.spec.rebuildSchedule).toBe('weekly');
    expect(formFromImage(weekly).rebuildSchedule).toBe('weekly');
    const importWithSchedule = { ...EMPTY_FORM, buildType: 'ImageImport' as const, fromImage: 'q/i:1', rebuildSchedule: 'daily' as const };
    expect(imageFromForm(importWithSchedule).spec.rebuildSchedule).toBeUndefined();
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
    expect(durationLabel(image)).toBe('built in 2 min 5 s');
  });

  it('says what the duration measured', () => {
    const failed = withStatus({
      phase: 'Failed',
      startTime: '2026-01-01T00:00:00Z',
      completionTime: '2026-01-01T00:00:12Z'
    });
    expect(durationLabel(failed)).toBe('failed after 12 s');
    const running = withStatus({ phase: 'Resolving', startTime: '2026-01-01T00:00:00Z' });
    expect(durationLabel(running, Date.parse('2026-01-01T00:00:05Z'))).toBe('running for 5 s');
    // finished without a completion time: no number that keeps ticking
    expect(durationLabel(withStatus({ phase: 'Ready', startTime: '2026-01-01T00:00:00Z' }))).toBe('');
    expect(formatDuration(23)).toBe('23 s');
    expect(formatDuration(3725)).toBe('1 h 2 min');
  });

  it('labels each earlier run with its own duration', () => {
    expect(
      runLabel({
        run: 1,
        phase: 'Ready',
        startTime: '2026-01-01T00:00:00Z',
        completionTime: '2026-01-01T00:00:23Z'
      })
    ).toBe('Run 1 · Ready · built in 23 s');
    expect(
      runLabel({
        run: 2,
        phase: 'Failed',
        startTime: '2026-01-01T00:00:00Z',
        completionTime: '2026-01-01T00:00:04Z',
        reason: 'Cancelled'
      })
    ).toBe('Run 2 · Failed · cancelled after 4 s');
    expect(
      runLabel({ run: 3, phase: 'Failed', startTime: '2026-01-01T00:00:00Z', completionTime: '2026-01-01T00:00:04Z', reason: 'Unresolvable' })
    ).toBe('Run 3 · Failed · failed after 4 s · Unresolvable');
    // no completion time: the reason still says what happened
    expect(runLabel({ run: 4, phase: 'Failed', reason: 'Cancelled' })).toBe('Run 4 · Failed · Cancelled');
  });

  it('says what started each rebuild', () => {
    expect(
      triggerLabel({
        kind: 'webhook',
        source: 'github',
        by: 'octocat',
        at: '2026-11-23T10:00:05Z',
        ref: 'refs/heads/main',
        from: '1a2b3c4d5e6f',
        to: '5d6e7f8a9b0c'
      })
    ).toBe('Push to main by octocat (GitHub webhook) · 1a2b3c4 → 5d6e7f8 · 2026-11-23 10:00 UTC');
    expect(triggerLabel({ kind: 'webhook', source: 'gitlab', ref: 'refs/heads/dev', to: 'abcdef0123' })).toBe(
      'Push to dev (GitLab webhook) · abcdef0'
    );
    expect(
      triggerLabel({
        kind: 'baseImage',
        image: 'quay.io/jupyter/minimal-notebook:latest',
        from: 'sha256:0123456789abcdef0123',
        to: 'sha256:fedcba9876543210fedc',
        at: '2026-11-23T08:00:00Z'
      })
    ).toBe('Base image quay.io/jupyter/minimal-notebook:latest updated · 0123456789ab → fedcba987654 · 2026-11-23 08:00 UTC');
    expect(
      triggerLabel({ kind: 'baseImage', image: 'cnbi:team-base', from: 'sha256:0123456789abcdef', to: 'sha256:fedcba9876543210' })
    ).toBe('New build of team-base, the image this one is built on · 0123456789ab → fedcba987654');
    expect(triggerLabel({ kind: 'schedule', schedule: 'weekly', at: '2026-11-30T00:00:00Z' })).toBe(
      'Weekly rebuild · 2026-11-30 00:00 UTC'
    );
    expect(triggerLabel({ kind: 'rebuild', by: 'alice', at: '2026-11-23T09:00:00Z' })).toBe(
      'Rebuild asked by alice · 2026-11-23 09:00 UTC'
    );
  });

  it('says why a Ready image on a failed base kept its build, and only then', () => {
    const stale = {
      type: 'BaseImageCurrent',
      status: 'False',
      reason: 'BaseImageFailed',
      message: 'team-base failed (ImagePullFailed: no such tag); this image keeps its current build'
    };
    const image = (phase: string, conditions: any[]) =>
      ({ metadata: { name: 'mine' }, spec: { buildType: 'PackageList' }, status: { phase, conditions } }) as ICustomNBImage;
    expect(baseFailedMessage(image('Ready', [stale]))).toBe(stale.message);
    expect(baseFailedMessage(image('Ready', [{ ...stale, status: 'True' }]))).toBeNull();
    expect(baseFailedMessage(image('Building', [stale]))).toBeNull();
    expect(baseFailedMessage(image('Ready', []))).toBeNull();
  });

  it('starts servers on the previous build while a rebuild works or after it failed', () => {
    const image = (phase: string, status: any) =>
      ({ metadata: { name: 'x' }, spec: { buildType: 'PackageList' }, status: { phase, ...status } }) as ICustomNBImage;
    expect(startableBuild(image('Ready', { image: 'r/x@sha256:2' }))).toEqual({ reference: 'r/x@sha256:2', previous: false });
    expect(startableBuild(image('Building', { rebuildOf: 'r/x@sha256:1' }))).toEqual({
      reference: 'r/x@sha256:1',
      previous: true
    });
    expect(startableBuild(image('Failed', { rebuildOf: 'r/x@sha256:1' }))?.previous).toBe(true);
    expect(startableBuild(image('Building', {}))).toBeNull();
    expect(startableBuild(image('Failed', {}))).toBeNull();
  });

  it('gives image sizes in human units', () => {
    expect(formatBytes(1_234_567_890)).toBe('1.2 GB');
    expect(formatBytes(850_000_000)).toBe('850 MB');
    expect(formatBytes(1_000)).toBe('1 kB');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(undefined)).toBe('');
  });

  it('says a cancelled build was cancelled, and by whom', () => {
    const image = withStatus({
      phase: 'Failed',
      failedPhase: 'Building',
      conditions: [
        { type: 'Cancelled', status: 'True', reason: 'Cancelled', message: 'cancelled by alice' }
      ]
    });
    expect(failureMessage(image)).toBe('cancelled by alice');
    expect(phaseProgress(image).label).toBe('Failed while building');
    // its duration says cancelled, not failed
    const timed = withStatus({
      ...image.status,
      startTime: '2026-01-01T00:00:00Z',
      completionTime: '2026-01-01T00:00:03Z'
    });
    expect(durationLabel(timed)).toBe('cancelled after 3 s');
    expect(
      durationLabel(withStatus({ ...timed.status, conditions: [{ type: 'ErrorBuildingImage', status: 'True', message: 'x' }] }))
    ).toBe('failed after 3 s');
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

describe('package messages', () => {
  const text = 'numpy\n\n# plotting\nmatplotlib\npandas\nPandas==2';

  it('puts the service’s message on the lines it names, with no field path', () => {
    const lines = parsePackageLines(text);
    const error = packageLineError(
      {
        message: 'Pandas is already listed',
        field: 'spec.packageVersions[3]',
        relatedField: 'spec.packageVersions[2]'
      },
      lines
    )!;
    expect(error).toEqual({ line: 5, message: 'Pandas is already listed', relatedLine: 4 });
    expect(packageErrorText(error)).toBe('Line 6: Pandas is already listed on line 5');
    const missing = packageLineError(
      { message: 'a version is missing after ==', field: 'spec.packageVersions[1]' },
      parsePackageLines('six\n\npandas==')
    )!;
    expect(packageErrorText(missing)).toBe('Line 3: a version is missing after ==');
    expect(packageLineError({ message: 'x', field: 'spec.baseImage' }, lines)).toBeNull();
  });

  it('never lets a field path into a message', () => {
    expect(withoutFieldPrefix('spec.repository: spec.repository: must be https', 'spec.repository')).toBe(
      'must be https'
    );
    expect(withoutFieldPrefix('spec.packageVersions[1]: bad', 'spec.packageVersions[1]')).toBe('bad');
    expect(withoutFieldPrefix('spec.fromImage: no tag', undefined)).toBe('no tag');
    expect(withoutFieldPrefix('pandas is already listed', 'spec.packageVersions[1]')).toBe(
      'pandas is already listed'
    );
  });

  it('finds duplicates and dangling operators in the service’s words', () => {
    expect(packageErrorText(checkPackageLines(text)!)).toBe('Line 6: Pandas is already listed on line 5');
    expect(packageErrorText(checkPackageLines('scikit_learn\nScikit-Learn>=1')!)).toBe(
      'Line 2: Scikit-Learn is already listed on line 1'
    );
    expect(packageErrorText(checkPackageLines('six\n# c\npandas== ')!)).toBe(
      'Line 3: a version is missing after =='
    );
    expect(checkPackageLines('six\npandas>=2\n')).toBeNull();
  });

  it('knows which input a field belongs to', () => {
    expect(formInputOf('spec.packageVersions[2]')).toBe('packagesText');
    expect(formInputOf('spec.repository')).toBe('repository');
    expect(formInputOf('spec.gitRef')).toBe('gitRef');
    expect(formInputOf('spec.fromImage')).toBe('fromImage');
    expect(formInputOf('spec.baseImage')).toBe('baseImage');
    expect(formInputOf('metadata.annotations["opendatahub.io/notebook-image-name"]')).toBe('displayName');
    expect(formInputOf('spec.buildType')).toBeNull();
    expect(formInputOf(undefined)).toBeNull();
  });
});

const listed = (name: string, created?: string, creator = 'alice', annotations: Record<string, string> = {}, rv = '1'): ICustomNBImage => ({
  metadata: {
    name,
    resourceVersion: rv,
    creationTimestamp: created,
    annotations: { 'opendatahub.io/notebook-image-creator': creator, ...annotations }
  },
  spec: { buildType: 'PackageList' },
  status: { phase: 'Ready' }
});

describe('the list', () => {
  const names = (list: ICustomNBImage[]) => list.map(i => i.metadata.name);

  it('has one order: newest first, then name', () => {
    const list = sortNewestFirst([
      listed('b', '2026-01-01T00:00:00Z'),
      listed('c', '2026-01-03T00:00:00Z'),
      listed('a', '2026-01-01T00:00:00Z'),
      listed('new')
    ]);
    expect(names(list)).toEqual(['new', 'c', 'a', 'b']);
  });

  it('keeps the order as live events add and update rows', () => {
    let list = sortNewestFirst([listed('b', '2026-01-02T00:00:00Z'), listed('a', '2026-01-01T00:00:00Z')]);
    list = upsertImage(list, listed('old', '2025-12-01T00:00:00Z'));
    list = upsertImage(list, listed('mid', '2026-01-01T12:00:00Z'));
    expect(names(list)).toEqual(['b', 'mid', 'a', 'old']);
    const updated = { ...listed('a', '2026-01-01T00:00:00Z', 'alice', {}, '5'), status: { phase: 'Failed' as const } };
    list = upsertImage(list, updated);
    expect(names(list)).toEqual(['b', 'mid', 'a', 'old']);
    expect(list[2].status?.phase).toBe('Failed');
    // an older version does not win
    expect(upsertImage(list, listed('a', '2026-01-01T00:00:00Z', 'alice', {}, '2'))[2].status?.phase).toBe('Failed');
    expect(names(mergeImages([listed('x', '2026-02-01T00:00:00Z')], list))).toEqual(['x', 'b', 'mid', 'a', 'old']);
  });

  it('puts each image in one section: mine, shared with me, everyone else’s by owner', () => {
    const images = [
      listed('mine', '2026-01-05T00:00:00Z', 'root'),
      listed('bob-everyone', '2026-01-04T00:00:00Z', 'bob', { 'cnbi-hub.io/shared': 'true' }),
      listed('bob-team', '2026-01-03T00:00:00Z', 'bob', { 'cnbi-hub.io/shared-with-groups': 'ops,team-a' }),
      listed('bob-private', '2026-01-02T00:00:00Z', 'bob'),
      listed('carol-other-team', '2026-01-01T00:00:00Z', 'carol', { 'cnbi-hub.io/shared-with-groups': 'ops' }),
      listed('aaron-private', '2026-01-01T00:00:00Z', 'aaron')
    ];
    const admin = imageSections(images, { name: 'root', admin: true, groups: ['team-a'] });
    expect(names(admin.mine)).toEqual(['mine']);
    expect(admin.shared.map(s => [s.image.metadata.name, sharedWithLabel(s.sharedWith)])).toEqual([
      ['bob-everyone', 'everyone'],
      ['bob-team', 'team-a']
    ]);
    expect(admin.others.map(o => [o.owner, names(o.images)])).toEqual([
      ['aaron', ['aaron-private']],
      ['bob', ['bob-private']],
      ['carol', ['carol-other-team']]
    ]);
    const all = [...admin.mine, ...admin.shared.map(s => s.image), ...admin.others.flatMap(o => o.images)];
    expect(new Set(names(all)).size).toBe(images.length);

    // a user sees no admin section; what the service listed for them is shared with them
    const user = imageSections(images.slice(1, 3), { name: 'alice', admin: false, groups: ['team-a'] });
    expect(user.mine).toEqual([]);
    expect(user.others).toEqual([]);
    expect(user.shared.map(s => sharedWithLabel(s.sharedWith))).toEqual(['everyone', 'team-a']);
  });
});

describe('edit as new, save environment', () => {
  const specs: ICustomNBImage['spec'][] = [
    { buildType: 'PackageList', baseImage: 'q/base:1', packageVersions: ['pandas>=2', 'numpy'] },
    { buildType: 'PackageList', baseImage: 'q/base:1', packageVersions: ['six'], runtimeEnvironment: { pythonVersion: '3.11' } },
    { buildType: 'GitRepository', baseImage: 'q/base:1', repository: 'https://example.org/r.git', gitRef: 'v1', packageVersions: ['six'] },
    { buildType: 'GitRepository', baseImage: 'q/base:1', repository: 'https://example.org/r.git' },
    { buildType: 'ImageImport', fromImage: 'quay.io/org/img:1' }
  ];

  it.each(specs.map(s => [s.buildType, s]))('round-trips a %s spec', (_, spec) => {
    const image: ICustomNBImage = {
      metadata: {
        name: 'x',
        annotations: {
          'opendatahub.io/notebook-image-name': 'Mine',
          'opendatahub.io/notebook-image-desc': 'about it'
        }
      },
      spec: spec as ICustomNBImage['spec'],
      status: { phase: 'Failed' }
    };
    const form = formFromImage(image);
    expect(form.buildType).toBe((spec as any).buildType);
    expect(form.displayName).toBe('Mine (copy)');
    expect(form.description).toBe('about it');
    expect(imageFromForm(form).spec).toEqual(spec);
  });

  it('fills the packages one per line', () => {
    expect(formFromImage({ metadata: {}, spec: specs[0] }).packagesText).toBe('pandas>=2\nnumpy');
  });

  it('turns an environment into a PackageList on the server’s image', () => {
    const env: IEnvironment = {
      baseImage: 'localhost/cnbi/alice/x@sha256:1',
      cnbiImage: 'x',
      baseline: 'manifest',
      added: [{ name: 'tabulate', version: '0.9.0' }],
      changed: [{ name: 'six', from: '1.16.0', to: '1.17.0' }],
      removed: [],
      requirements: ['tabulate==0.9.0', 'six==1.17.0']
    };
    const form = formFromEnvironment(env);
    expect(imageFromForm({ ...form, displayName: 'env' }).spec).toEqual({
      buildType: 'PackageList',
      baseImage: 'localhost/cnbi/alice/x@sha256:1',
      packageVersions: ['tabulate==0.9.0', 'six==1.17.0']
    });
    expect(environmentIsEmpty(env)).toBe(false);
    expect(environmentIsEmpty({ ...env, added: [], changed: [], requirements: [], removed: [{ name: 'a', version: '1' }] })).toBe(
      true
    );
  });
});

describe('build-finished notifications', () => {
  const img = (phase: string, run = 1): ICustomNBImage => ({
    metadata: { name: 'x', annotations: { 'opendatahub.io/notebook-image-name': 'My X' } },
    spec: { buildType: 'PackageList' },
    status: {
      phase: phase as any,
      run,
      conditions:
        phase === 'Failed'
          ? [{ type: 'ErrorResolvingDependencies', status: 'True', message: 'No solution found\nbecause pandas==99 does not exist' }]
          : []
    }
  });
  const hidden = { tracked: true, visible: false };

  it('tells when a tracked build finishes out of sight', () => {
    expect(buildFinishedNotice({ phase: 'Building', run: 1 }, img('Ready'), hidden)).toEqual({
      kind: 'success',
      name: 'x',
      message: 'Image “My X” is ready.'
    });
    expect(buildFinishedNotice({ phase: 'Resolving', run: 1 }, img('Failed'), hidden)).toEqual({
      kind: 'error',
      name: 'x',
      message: 'Image “My X” failed: No solution found'
    });
    // a rebuild that finished before its first unfinished version was seen
    expect(buildFinishedNotice({ phase: 'Ready', run: 1 }, img('Ready', 2), hidden)?.kind).toBe('success');
  });

  it('stays quiet otherwise', () => {
    expect(buildFinishedNotice({ phase: 'Building', run: 1 }, img('Ready'), { tracked: true, visible: true })).toBeNull();
    expect(buildFinishedNotice({ phase: 'Building', run: 1 }, img('Ready'), { tracked: false, visible: false })).toBeNull();
    expect(buildFinishedNotice({ phase: 'Ready', run: 1 }, img('Ready'), hidden)).toBeNull();
    expect(buildFinishedNotice({ phase: 'Prepare', run: 1 }, img('Building'), hidden)).toBeNull();
    expect(buildFinishedNotice(undefined, img('Ready'), hidden)).toBeNull();
  });
});

describe('logs', () => {
  it('recognises the separator a rebuild’s run starts with', () => {
    expect(logSeparator('=== Run 2 · rebuild requested by alice · 2026-11-23T09:00:00Z ===')).toEqual({
      run: 2,
      label: 'Run 2 · rebuild requested by alice · 2026-11-23T09:00:00Z'
    });
    expect(logSeparator('=== Running pip')).toBeNull();
    expect(logSeparator('STEP 1/3')).toBeNull();
  });

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

describe('who may change an image', () => {
  const owned = (creator?: string): ICustomNBImage => ({
    metadata: {
      name: 'img',
      annotations: creator ? { 'opendatahub.io/notebook-image-creator': creator } : {}
    },
    spec: { buildType: 'PackageList' },
    status: { phase: 'Ready' }
  });

  it('its owner and admins; not the users it is shared with', () => {
    const alice = { name: 'alice', admin: false, groups: ['team'] };
    expect(mayChange(owned('alice'), alice)).toBe(true);
    expect(mayChange(owned('bob'), alice)).toBe(false);
    expect(mayChange(owned('bob'), { name: 'root', admin: true, groups: [] })).toBe(true);
    // no creator: listed as mine; nobody known: the service decides
    expect(mayChange(owned(), alice)).toBe(true);
    expect(mayChange(owned('bob'), undefined)).toBe(true);
  });
});

describe('edit as new', () => {
  it('says what the form was filled from', () => {
    const image: ICustomNBImage = {
      metadata: { name: 'tools-x7k2p', annotations: { 'opendatahub.io/notebook-image-name': 'Tools' } },
      spec: { buildType: 'PackageList' }
    };
    expect(editAsNewNotice(image)).toBe(
      'A copy of “Tools” (tools-x7k2p): change what you need, then build it as a new image. The original stays as it is.'
    );
  });
});

describe('git credentials', () => {
  it('names the host a token is for as the service compares it', () => {
    expect(repositoryHost('https://GitHub.com/org/repo')).toBe('github.com');
    expect(repositoryHost(' https://git.example.org:8443/r.git ')).toBe('git.example.org:8443');
    expect(repositoryHost('https://github.com:443/r')).toBe('github.com');
    expect(repositoryHost('not a url')).toBe('');
    expect(credentialNameFor('git.example.org:8443')).toBe('git-example-org-8443');
    expect(credentialNameFor('')).toBe('git-token');
  });

  it('puts the credential in the spec of a git image only', () => {
    const form = { ...EMPTY_FORM, displayName: 'x', buildType: 'GitRepository' as const, repository: 'https://h/r', gitCredential: 'gh' };
    expect(imageFromForm(form).spec.gitCredential).toBe('gh');
    expect(imageFromForm({ ...form, buildType: 'PackageList', packagesText: 'six' }).spec.gitCredential).toBeUndefined();
    expect(formFromImage(imageFromForm(form)).gitCredential).toBe('gh');
    expect(formInputOf('spec.gitCredential')).toBe('gitCredential');
  });
});

describe('generations', () => {
  it('says what changed in a few words, and how many more', () => {
    const changes = {
      added: ['a 1', 'b 2', 'c 3', 'd 4'],
      removed: ['x 1'],
      changed: [],
      counts: { added: 5, removed: 1, changed: 0 }
    };
    expect(changesLabel(changes)).toBe('5 added (a 1, b 2, c 3, …) · removed x 1');
    expect(changesLabel({ added: [], removed: [], changed: [], counts: { added: 0, removed: 0, changed: 0 } })).toBe('');
    expect(triggerLabel({ kind: 'rollback', by: 'alice', toRun: 2, at: '2026-11-23T10:00:00Z' })).toBe(
      'Run 2’s build made current again by alice · 2026-11-23 10:00 UTC'
    );
  });
});

describe('a newer build of the image this server runs', () => {
  const ready = (digest: string, phase = 'Ready'): any => ({
    metadata: { name: 'mine' },
    spec: { buildType: 'PackageList' },
    status: { phase, run: 4, image: digest }
  });
  it('is the Ready image on another digest than the server started on', () => {
    const server = { cnbiImage: 'mine', jupyterImage: 'reg/mine@sha256:1', serverName: '' };
    expect(newerBuildOf(server, ready('reg/mine@sha256:2'))).toEqual({ name: 'mine', run: 4 });
    expect(newerBuildOf(server, ready('reg/mine@sha256:1'))).toBeNull();
    expect(newerBuildOf(server, ready('reg/mine@sha256:2', 'Building'))).toBeNull();
    expect(newerBuildOf({ ...server, cnbiImage: 'other' }, ready('reg/mine@sha256:2'))).toBeNull();
    expect(newerBuildOf({ ...server, jupyterImage: null }, ready('reg/mine@sha256:2'))).toBeNull();
    expect(newerBuildOf(null, ready('reg/mine@sha256:2'))).toBeNull();
  });
});
