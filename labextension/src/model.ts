/**
 * The CustomNBImage object as the Lab panel sees it, and the pure functions the views are built
 * from: phase → progress, durations, failure text, package lines ↔ spec indices.
 * (Contract: docs/object.md.)
 */

export const ANNOTATION_DISPLAY_NAME = 'opendatahub.io/notebook-image-name';
export const ANNOTATION_DESCRIPTION = 'opendatahub.io/notebook-image-desc';
export const ANNOTATION_CREATOR = 'opendatahub.io/notebook-image-creator';
export const ANNOTATION_SHARED = 'cnbi-hub.io/shared';

export type BuildType = 'ImageImport' | 'PackageList' | 'GitRepository';
export type Phase =
  | 'Pending'
  | 'Prepare'
  | 'Resolving'
  | 'Building'
  | 'Ready'
  | 'Failed';

export interface ICondition {
  type: string;
  status: 'True' | 'False' | 'Unknown' | string;
  reason?: string;
  message?: string;
  lastTransitionTime?: string;
}

export interface IPackage {
  name: string;
  version: string;
  visible?: boolean;
}

export interface ICustomNBImage {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name?: string;
    uid?: string;
    resourceVersion?: string;
    creationTimestamp?: string;
    annotations?: Record<string, string>;
    labels?: Record<string, string>;
  };
  spec: {
    buildType: BuildType;
    fromImage?: string;
    baseImage?: string;
    packageVersions?: string[];
    repository?: string;
    gitRef?: string;
    runtimeEnvironment?: Record<string, string>;
  };
  status?: {
    phase?: Phase;
    conditions?: ICondition[];
    queuePosition?: number;
    image?: string;
    packages?: IPackage[];
    phaseTimes?: Partial<Record<Phase, string>>;
    startTime?: string;
    completionTime?: string;
    reusedFrom?: string;
    gitCommit?: string;
    lockHash?: string;
  };
}

export interface IBaseImage {
  image: string;
  displayName?: string;
  description?: string;
}

export interface ICheckImageResult {
  exists: boolean;
  digest?: string;
  platforms?: string[];
}

/** The steps the progress bar shows, in order. */
export const PROGRESS_STEPS: Phase[] = [
  'Prepare',
  'Resolving',
  'Building',
  'Ready'
];

export interface IProgress {
  /** Index into PROGRESS_STEPS of the step under way (or where it failed); -1 before Prepare. */
  step: number;
  /** 0..1, how far along the bar is. */
  fraction: number;
  failed: boolean;
  done: boolean;
  label: string;
}

export function phaseOf(image: ICustomNBImage): Phase {
  return image.status?.phase ?? 'Pending';
}

export function nameOf(image: ICustomNBImage): string {
  return image.metadata.name ?? '';
}

export function displayNameOf(image: ICustomNBImage): string {
  return image.metadata.annotations?.[ANNOTATION_DISPLAY_NAME] || nameOf(image);
}

export function descriptionOf(image: ICustomNBImage): string {
  return image.metadata.annotations?.[ANNOTATION_DESCRIPTION] ?? '';
}

export function creatorOf(image: ICustomNBImage): string {
  return image.metadata.annotations?.[ANNOTATION_CREATOR] ?? '';
}

export function isShared(image: ICustomNBImage): boolean {
  return image.metadata.annotations?.[ANNOTATION_SHARED] === 'true';
}

export function isTerminal(phase: Phase): boolean {
  return phase === 'Ready' || phase === 'Failed';
}

/** The step a failed build stopped at: the latest step that had begun (phaseTimes). */
function failedStep(image: ICustomNBImage): number {
  const times = image.status?.phaseTimes ?? {};
  let step = 0;
  PROGRESS_STEPS.forEach((phase, index) => {
    if (phase !== 'Ready' && times[phase]) {
      step = index;
    }
  });
  return step;
}

/** Phase → position on the Prepare → Resolving → Building → Ready bar. */
export function phaseProgress(image: ICustomNBImage): IProgress {
  const phase = phaseOf(image);
  const steps = PROGRESS_STEPS.length;
  if (phase === 'Ready') {
    return { step: steps - 1, fraction: 1, failed: false, done: true, label: 'Ready' };
  }
  if (phase === 'Failed') {
    const step = failedStep(image);
    return {
      step,
      fraction: (step + 0.5) / steps,
      failed: true,
      done: true,
      label: `Failed while ${PROGRESS_STEPS[step].toLowerCase()}`
    };
  }
  if (phase === 'Pending') {
    const queue = image.status?.queuePosition;
    return {
      step: -1,
      fraction: 0,
      failed: false,
      done: false,
      label: queue ? `Waiting for a build slot (#${queue})` : 'Pending'
    };
  }
  const step = PROGRESS_STEPS.indexOf(phase);
  return {
    step,
    fraction: (step + 0.5) / steps,
    failed: false,
    done: false,
    label: phase
  };
}

/** Build duration in seconds: from the start to completion (or to `now` while running). */
export function buildDurationSeconds(
  image: ICustomNBImage,
  now: number = Date.now()
): number | null {
  const status = image.status ?? {};
  const times = status.phaseTimes ?? {};
  const start =
    status.startTime ??
    times.Pending ??
    times.Prepare ??
    image.metadata.creationTimestamp;
  if (!start) {
    return null;
  }
  const end =
    status.completionTime ??
    (phaseOf(image) === 'Ready' ? times.Ready : undefined) ??
    (phaseOf(image) === 'Failed' ? times.Failed : undefined);
  const startMs = Date.parse(start);
  const endMs = end ? Date.parse(end) : now;
  if (isNaN(startMs) || isNaN(endMs)) {
    return null;
  }
  return Math.max(0, Math.round((endMs - startMs) / 1000));
}

export function formatDuration(seconds: number | null): string {
  if (seconds === null) {
    return '';
  }
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h) {
    return `${h}h ${m}m`;
  }
  if (m) {
    return `${m}m ${s}s`;
  }
  return `${s}s`;
}

/**
 * Why a build failed, in the words of the condition that says so: an `Error...` condition that
 * is True, else a condition that turned False with a message, newest first.
 */
export function failureMessage(image: ICustomNBImage): string | null {
  if (phaseOf(image) !== 'Failed') {
    return null;
  }
  const conditions = [...(image.status?.conditions ?? [])].sort((a, b) =>
    (b.lastTransitionTime ?? '').localeCompare(a.lastTransitionTime ?? '')
  );
  const errorTrue = conditions.find(
    c => /^Error|Failed$/.test(c.type) && c.status === 'True' && c.message
  );
  const turnedFalse = conditions.find(c => c.status === 'False' && c.message);
  const found = errorTrue ?? turnedFalse;
  return found?.message ?? 'The build failed; see the build log for details.';
}

/** The packages textarea: one requirement per line, blank lines and # comments skipped. */
export interface IPackageLines {
  packages: string[];
  /** lineOfPackage[i] = 0-based textarea line of spec.packageVersions[i] */
  lineOfPackage: number[];
}

export function parsePackageLines(text: string): IPackageLines {
  const packages: string[] = [];
  const lineOfPackage: number[] = [];
  text.split('\n').forEach((raw, line) => {
    const value = raw.replace(/\s+#.*$/, '').trim();
    if (value && !value.startsWith('#')) {
      packages.push(value);
      lineOfPackage.push(line);
    }
  });
  return { packages, lineOfPackage };
}

/** `spec.packageVersions[3]` → the textarea line that held entry 3, or null if not a package. */
export function packageErrorLine(
  field: string | undefined | null,
  lines: IPackageLines
): number | null {
  const match = /^spec\.packageVersions\[(\d+)\]/.exec(field ?? '');
  if (!match) {
    return null;
  }
  const line = lines.lineOfPackage[Number(match[1])];
  return line === undefined ? null : line;
}

export interface IImageForm {
  displayName: string;
  description: string;
  buildType: BuildType;
  baseImage: string;
  packagesText: string;
  repository: string;
  gitRef: string;
  fromImage: string;
}

export const EMPTY_FORM: IImageForm = {
  displayName: '',
  description: '',
  buildType: 'PackageList',
  baseImage: '',
  packagesText: '',
  repository: '',
  gitRef: '',
  fromImage: ''
};

/** The create form → the object POSTed to api/images (the service picks metadata.name). */
export function imageFromForm(form: IImageForm): ICustomNBImage {
  const annotations: Record<string, string> = {
    [ANNOTATION_DISPLAY_NAME]: form.displayName.trim()
  };
  if (form.description.trim()) {
    annotations[ANNOTATION_DESCRIPTION] = form.description.trim();
  }
  const spec: ICustomNBImage['spec'] = { buildType: form.buildType };
  if (form.buildType === 'ImageImport') {
    spec.fromImage = form.fromImage.trim();
  } else {
    if (form.baseImage) {
      spec.baseImage = form.baseImage;
    }
    const packages = parsePackageLines(form.packagesText).packages;
    if (form.buildType === 'PackageList' || packages.length) {
      spec.packageVersions = packages;
    }
    if (form.buildType === 'GitRepository') {
      spec.repository = form.repository.trim();
      if (form.gitRef.trim()) {
        spec.gitRef = form.gitRef.trim();
      }
    }
  }
  return {
    apiVersion: 'meteor.zone/v1alpha1',
    kind: 'CustomNBImage',
    metadata: { annotations },
    spec
  };
}

/**
 * Joins the log fetched from api/images/{name}/logs with live lines that arrived while it was
 * being fetched: the longest overlap between the fetched tail and the live head is kept once.
 */
export function mergeLogTail(fetched: string[], live: string[]): string[] {
  const max = Math.min(fetched.length, live.length);
  for (let k = max; k > 0; k--) {
    let same = true;
    for (let i = 0; i < k; i++) {
      if (fetched[fetched.length - k + i] !== live[i]) {
        same = false;
        break;
      }
    }
    if (same) {
      return fetched.concat(live.slice(k));
    }
  }
  return fetched.concat(live);
}
