/**
 * The CustomNBImage object as the Lab panel sees it, and the pure functions the views are built
 * from: phase → progress, durations, failure text, package lines ↔ spec indices.
 * (Contract: docs/object.md.)
 */

export const ANNOTATION_DISPLAY_NAME = 'opendatahub.io/notebook-image-name';
export const ANNOTATION_DESCRIPTION = 'opendatahub.io/notebook-image-desc';
export const ANNOTATION_CREATOR = 'opendatahub.io/notebook-image-creator';
export const ANNOTATION_SHARED = 'cnbi-hub.io/shared';
export const ANNOTATION_SHARED_GROUPS = 'cnbi-hub.io/shared-with-groups';

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
    /** The name of one of the creator's stored git credentials (a private repository). */
    gitCredential?: string;
    runtimeEnvironment?: Record<string, string>;
    rebuildSchedule?: RebuildSchedule;
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
    /** Failed: the phase it failed (or was cancelled) in. */
    failedPhase?: Phase;
    /** Number of the current run: 1 for the first build, 2 after the first rebuild… */
    run?: number;
    /** Earlier runs, oldest first. */
    runs?: IRun[];
    /** Size in bytes of the built image (Ready images, when known). */
    imageSize?: number;
    /** What started each rebuild, oldest first. */
    triggers?: ITrigger[];
    /** A push that came during the current run: its rebuild follows the run. */
    rebuildAfter?: ITrigger;
    /** The newest good build, while a rebuild works or after it failed. */
    rebuildOf?: string;
  };
}

/** What started a rebuild (status.triggers): a person, a push webhook, or a base image's tag
 * that moved to another digest. */
export interface ITrigger {
  kind: 'rebuild' | 'webhook' | 'baseImage' | 'schedule' | 'rollback' | 'restore';
  /** The run it started. */
  run?: number;
  /** rollback: the run whose build was made current again; restore: the run built again. */
  toRun?: number;
  /** schedule: daily, weekly or monthly. */
  schedule?: string;
  /** baseImage: the tag that moved. */
  image?: string;
  /** Webhooks: github or gitlab. */
  source?: string;
  delivery?: string;
  /** Who asked, or who pushed. */
  by?: string;
  at?: string;
  ref?: string;
  /** The commit (or base digest) built before, and the one pushed (or the tag's new digest). */
  from?: string;
  to?: string;
}

/** One earlier run of an image (status.runs). */
export interface IRun {
  run: number;
  phase: Phase;
  startTime?: string;
  completionTime?: string;
  reason?: string;
  reusedFrom?: string;
  image?: string;
}

export interface IBaseImage {
  image: string;
  displayName?: string;
  description?: string;
}

/** GET api/check-image: `private` = the registry wants credentials (a pull secret). */
export type CheckImageAnswer = 'found' | 'notFound' | 'private';

export interface ICheckImageResult {
  result: CheckImageAnswer;
  /** null when the registry would not say (private). */
  exists: boolean | null;
  digest?: string | null;
  platforms?: string[];
  message?: string;
}

/** The hub user the panel works for (api/settings `user`). */
export interface IUserInfo {
  name: string;
  admin: boolean;
  groups: string[];
}

/** GET {baseUrl}cnbi/server-info: what this server runs on. */
export interface IServerInfo {
  cnbiImage: string | null;
  jupyterImage: string | null;
  serverName: string;
}

/** GET {baseUrl}cnbi/environment: what the user installed into this running server. */
export interface IEnvironment {
  baseImage: string;
  cnbiImage: string | null;
  baseline: 'manifest' | 'startup' | string;
  added: { name: string; version: string }[];
  changed: { name: string; from: string; to: string }[];
  removed: { name: string; version: string }[];
  requirements: string[];
}

/** The steps the progress bar shows, in order. */
export const PROGRESS_STEPS: Phase[] = [
  'Prepare',
  'Resolving',
  'Building',
  'Ready'
];

const STEP_VERBS: Partial<Record<Phase, string>> = {
  Prepare: 'preparing',
  Resolving: 'resolving',
  Building: 'building'
};

export interface IProgress {
  /** The phase the badge shows: badge and bar are drawn from this one value. */
  phase: Phase;
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

/** The JupyterHub groups an image is shared with (annotation, comma-separated). */
export function sharedGroupsOf(image: ICustomNBImage): string[] {
  return (image.metadata.annotations?.[ANNOTATION_SHARED_GROUPS] ?? '')
    .split(',')
    .map(g => g.trim())
    .filter(g => g);
}

/** Milliseconds of a creationTimestamp; not yet stamped (just created) counts as newest. */
function createdMs(image: ICustomNBImage): number {
  const stamp = image.metadata.creationTimestamp;
  const ms = stamp ? Date.parse(stamp) : NaN;
  return isNaN(ms) ? Infinity : ms;
}

/** Newest first: creationTimestamp descending (not yet stamped = newest), then name. */
export function compareNewestFirst(a: ICustomNBImage, b: ICustomNBImage): number {
  const ta = createdMs(a);
  const tb = createdMs(b);
  if (ta !== tb) {
    return ta < tb ? 1 : -1;
  }
  return nameOf(a).localeCompare(nameOf(b));
}

export function sortNewestFirst(images: readonly ICustomNBImage[]): ICustomNBImage[] {
  return [...images].sort(compareNewestFirst);
}

/** The later of two versions of one object (resourceVersion; equal → the one just seen). */
export function newerOf(a: ICustomNBImage, b: ICustomNBImage): ICustomNBImage {
  const va = Number(a.metadata.resourceVersion ?? 0);
  const vb = Number(b.metadata.resourceVersion ?? 0);
  return vb >= va ? b : a;
}

/** The list with `image` added or replaced (if newer), still newest first. */
export function upsertImage(
  list: readonly ICustomNBImage[],
  image: ICustomNBImage
): ICustomNBImage[] {
  const index = list.findIndex(i => nameOf(i) === nameOf(image));
  if (index >= 0) {
    const next = newerOf(list[index], image);
    if (next === list[index]) {
      return list as ICustomNBImage[];
    }
    const copy = list.slice();
    copy[index] = next;
    return sortNewestFirst(copy);
  }
  return sortNewestFirst([...list, image]);
}

/** Two versions of the list joined (each object's newer version), newest first. */
export function mergeImages(
  list: readonly ICustomNBImage[],
  more: readonly ICustomNBImage[]
): ICustomNBImage[] {
  const byName = new Map<string, ICustomNBImage>();
  for (const image of [...list, ...more]) {
    const known = byName.get(nameOf(image));
    byName.set(nameOf(image), known ? newerOf(known, image) : image);
  }
  return sortNewestFirst([...byName.values()]);
}

/** A row of "Shared with me": the image and who it is shared with, as the label says. */
export interface ISharedImage {
  image: ICustomNBImage;
  /** 'everyone', or the groups (of mine, if known) it is shared with. */
  sharedWith: 'everyone' | string[];
}

export interface IImageSections {
  mine: ICustomNBImage[];
  shared: ISharedImage[];
  /** Admins: everyone else's images, by owner (owners sorted), each list newest first. */
  others: { owner: string; images: ICustomNBImage[] }[];
}

/**
 * The list's sections: my images; images of others shared with everyone or with a group of
 * mine; and (admins) the rest, by owner. Each image is in exactly one section.
 */
export function imageSections(
  images: readonly ICustomNBImage[],
  user: IUserInfo
): IImageSections {
  const mine: ICustomNBImage[] = [];
  const shared: ISharedImage[] = [];
  const byOwner = new Map<string, ICustomNBImage[]>();
  for (const image of sortNewestFirst(images)) {
    const creator = creatorOf(image);
    if (!creator || creator === user.name) {
      mine.push(image);
      continue;
    }
    const groups = sharedGroupsOf(image);
    const myGroups = groups.filter(g => user.groups.includes(g));
    if (isShared(image)) {
      shared.push({ image, sharedWith: 'everyone' });
    } else if (myGroups.length) {
      shared.push({ image, sharedWith: myGroups });
    } else if (user.admin) {
      byOwner.set(creator, [...(byOwner.get(creator) ?? []), image]);
    } else {
      // Not mine and not admin: the service only lists it because it is shared with me
      // (e.g. through a group the settings did not report).
      shared.push({ image, sharedWith: groups });
    }
  }
  const others = [...byOwner.keys()]
    .sort((a, b) => a.localeCompare(b))
    .map(owner => ({ owner, images: byOwner.get(owner)! }));
  return { mine, shared, others };
}

/**
 * Whether `user` may change `image` (cancel, rebuild, delete, share): admins, and its owner. An
 * image without a creator is the user's own (the list puts it under "My images"). Anyone else
 * only uses it: the service refuses their changes.
 */
export function mayChange(image: ICustomNBImage, user: IUserInfo | null | undefined): boolean {
  if (!user) {
    return true; // nobody to tell apart: the service decides
  }
  const creator = creatorOf(image);
  return user.admin || !creator || creator === user.name;
}

/** The line above the form "Edit as new" opens: what it was filled from. */
export function editAsNewNotice(image: ICustomNBImage): string {
  return (
    `A copy of “${displayNameOf(image)}” (${nameOf(image)}): change what you need, ` +
    'then build it as a new image. The original stays as it is.'
  );
}

/** "everyone", or the group names, for the Shared with me label. */
export function sharedWithLabel(sharedWith: ISharedImage['sharedWith']): string {
  if (sharedWith === 'everyone') {
    return 'everyone';
  }
  return sharedWith.length ? sharedWith.join(', ') : 'a group';
}

export function isTerminal(phase: Phase): boolean {
  return phase === 'Ready' || phase === 'Failed';
}

/**
 * The step a failed build stopped at: status.failedPhase when the service says, else the latest
 * step that had begun in the current run (phaseTimes not older than status.startTime, so a
 * rebuild's failure is not placed at a step only the previous run reached).
 */
function failedStep(image: ICustomNBImage): number {
  const status = image.status ?? {};
  const failed = status.failedPhase;
  if (failed && failed !== 'Ready' && failed !== 'Failed') {
    return Math.max(0, PROGRESS_STEPS.indexOf(failed));
  }
  const times = status.phaseTimes ?? {};
  const start = status.startTime ? Date.parse(status.startTime) : NaN;
  let step = 0;
  PROGRESS_STEPS.forEach((phase, index) => {
    const time = phase !== 'Ready' ? times[phase] : undefined;
    if (time && !(Date.parse(time) < start)) {
      step = index;
    }
  });
  return step;
}

/** Phase → position on the Prepare → Resolving → Building → Ready bar (and the badge's phase). */
export function phaseProgress(image: ICustomNBImage): IProgress {
  const phase = phaseOf(image);
  const steps = PROGRESS_STEPS.length;
  if (phase === 'Ready') {
    return { phase, step: steps - 1, fraction: 1, failed: false, done: true, label: 'Ready' };
  }
  if (phase === 'Failed') {
    const step = failedStep(image);
    return {
      phase,
      step,
      fraction: (step + 0.5) / steps,
      failed: true,
      done: true,
      label: `Failed while ${STEP_VERBS[PROGRESS_STEPS[step]] ?? PROGRESS_STEPS[step].toLowerCase()}`
    };
  }
  if (phase === 'Pending') {
    const queue = image.status?.queuePosition;
    return {
      phase,
      step: -1,
      fraction: 0,
      failed: false,
      done: false,
      label: queue ? `Waiting for a build slot (#${queue})` : 'Pending'
    };
  }
  const step = PROGRESS_STEPS.indexOf(phase);
  return {
    phase,
    step,
    fraction: (step + 0.5) / steps,
    failed: false,
    done: false,
    label: phase
  };
}

function secondsBetween(start?: string, end?: string, now: number = Date.now()): number | null {
  if (!start) {
    return null;
  }
  const startMs = Date.parse(start);
  const endMs = end ? Date.parse(end) : now;
  if (isNaN(startMs) || isNaN(endMs)) {
    return null;
  }
  return Math.max(0, Math.round((endMs - startMs) / 1000));
}

/**
 * Duration of the current run in seconds: from its start to completion (or to `now` while
 * running). status.startTime / completionTime belong to the current run only.
 */
export function buildDurationSeconds(
  image: ICustomNBImage,
  now: number = Date.now()
): number | null {
  const status = image.status ?? {};
  const times = status.phaseTimes ?? {};
  const phase = phaseOf(image);
  const start =
    status.startTime ??
    times.Pending ??
    times.Prepare ??
    image.metadata.creationTimestamp;
  const end =
    status.completionTime ??
    (phase === 'Ready' ? times.Ready : undefined) ??
    (phase === 'Failed' ? times.Failed : undefined);
  if (isTerminal(phase) && !end) {
    return null; // finished, but not when: a ticking number would be wrong
  }
  return secondsBetween(start, end, now);
}

/** "23 s", "1 min 30 s", "2 h 5 min". */
export function formatDuration(seconds: number | null): string {
  if (seconds === null) {
    return '';
  }
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h) {
    return `${h} h ${m} min`;
  }
  if (m) {
    return `${m} min ${s} s`;
  }
  return `${s} s`;
}

/**
 * What a duration measured, said with it: "built in 23 s", "failed after 12 s", "cancelled
 * after 3 s" (a Failed run someone cancelled)…
 */
export function durationText(phase: Phase, seconds: number | null, cancelled = false): string {
  if (seconds === null) {
    return '';
  }
  const d = formatDuration(seconds);
  switch (phase) {
    case 'Ready':
      return `built in ${d}`;
    case 'Failed':
      return cancelled ? `cancelled after ${d}` : `failed after ${d}`;
    case 'Pending':
      return `waiting for ${d}`;
    default:
      return `running for ${d}`;
  }
}

/** The current run's labelled duration: "built in 23 s", "running for 5 s", "cancelled after 2 s"… */
export function durationLabel(image: ICustomNBImage, now: number = Date.now()): string {
  return durationText(phaseOf(image), buildDurationSeconds(image, now), isCancelled(image));
}

/** An earlier run, one line: "Run 1 · Ready · built in 23 s". */
export function runLabel(run: IRun): string {
  const parts = [`Run ${run.run}`, run.phase];
  const cancelled = run.phase === 'Failed' && run.reason === 'Cancelled';
  const duration = durationText(run.phase, secondsBetween(run.startTime, run.completionTime), cancelled);
  if (run.completionTime && duration) {
    parts.push(duration);
  }
  if (run.reason && run.phase === 'Failed' && !(cancelled && run.completionTime && duration)) {
    parts.push(run.reason);
  }
  if (run.reusedFrom) {
    parts.push(`reused ${run.reusedFrom}`);
  }
  return parts.join(' · ');
}

const PROVIDER_NAMES: Record<string, string> = { github: 'GitHub', gitlab: 'GitLab' };

/** One line for a trigger: "Push to main by octocat (GitHub webhook) · 1a2b3c4 → 5d6e7f8 ·
 * 2026-11-23 10:00 UTC", or "Rebuild asked by alice · 2026-11-23 10:00 UTC". */
export function triggerLabel(trigger: ITrigger): string {
  const when = trigger.at ? `${trigger.at.slice(0, 16).replace('T', ' ')} UTC` : '';
  const parts: string[] = [];
  if (trigger.kind === 'webhook') {
    const branch = (trigger.ref ?? '').replace(/^refs\/heads\//, '');
    const provider = PROVIDER_NAMES[trigger.source ?? ''] ?? trigger.source ?? 'a';
    parts.push(`Push to ${branch || 'a branch'}${trigger.by ? ` by ${trigger.by}` : ''} (${provider} webhook)`);
    const to = (trigger.to ?? '').slice(0, 7);
    if (to) {
      parts.push(trigger.from ? `${trigger.from.slice(0, 7)} → ${to}` : to);
    }
  } else if (trigger.kind === 'baseImage') {
    const image = trigger.image ?? '';
    parts.push(
      image.startsWith('cnbi:')
        ? `New build of ${image.slice('cnbi:'.length)}, the image this one is built on`
        : `Base image ${image} updated`
    );
    const short = (digest?: string) => (digest ?? '').replace(/^sha256:/, '').slice(0, 12);
    if (trigger.to) {
      parts.push(trigger.from ? `${short(trigger.from)} → ${short(trigger.to)}` : short(trigger.to));
    }
  } else if (trigger.kind === 'rollback') {
    parts.push(`Run ${trigger.toRun ?? '?'}’s build made current again by ${trigger.by ?? 'someone'}`);
  } else if (trigger.kind === 'restore') {
    parts.push(`Run ${trigger.toRun ?? '?'}’s build built again from its lock by ${trigger.by ?? 'someone'}`);
  } else if (trigger.kind === 'schedule') {
    const schedule = trigger.schedule ?? 'scheduled';
    parts.push(`${schedule.charAt(0).toUpperCase()}${schedule.slice(1)} rebuild`);
  } else {
    parts.push(`Rebuild asked by ${trigger.by ?? 'someone'}`);
  }
  if (when) {
    parts.push(when);
  }
  return parts.join(' · ');
}

/** Bytes in human units, decimal as podman and registries count: "1.2 GB", "850 MB". */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !isFinite(bytes) || bytes < 0) {
    return '';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits).replace(/\.0$/, '')} ${units[unit]}`;
}

/** A build log line that starts a run (`=== Run 2 · rebuild requested by alice · … ===`). */
export const RUN_SEPARATOR = /^=== Run (\d+) /;

export function logSeparator(line: string): { run: number; label: string } | null {
  const match = RUN_SEPARATOR.exec(line);
  if (!match) {
    return null;
  }
  const label = line.replace(/^===\s*/, '').replace(/\s*===\s*$/, '');
  return { run: Number(match[1]), label };
}

/**
 * Why a build failed, in the words of the condition that says so: a cancellation, an
 * `Error...` condition that is True, else a condition that turned False with a message, newest
 * first. The message may hold several lines (uv's sentences): show it with pre-wrap.
 */
export function failureMessage(image: ICustomNBImage): string | null {
  if (phaseOf(image) !== 'Failed') {
    return null;
  }
  const conditions = [...(image.status?.conditions ?? [])].sort((a, b) =>
    (b.lastTransitionTime ?? '').localeCompare(a.lastTransitionTime ?? '')
  );
  const errorTrue = conditions.find(
    c =>
      c.message &&
      (c.reason === 'Cancelled' || (/^Error|Failed$/.test(c.type) && c.status === 'True'))
  );
  const turnedFalse = conditions.find(c => c.status === 'False' && c.message);
  const found = errorTrue ?? turnedFalse;
  return found?.message ?? 'The build failed; see the build log for details.';
}

/**
 * Why a Ready image built on another image (`cnbi:<name>`) was not rebuilt: that image's
 * newest run failed, so this one keeps its build (the engine's `BaseImageCurrent` condition).
 */
export function baseFailedMessage(image: ICustomNBImage): string | null {
  if (phaseOf(image) !== 'Ready') {
    return null;
  }
  const stale = (image.status?.conditions ?? []).find(
    c => c.type === 'BaseImageCurrent' && c.status === 'False'
  );
  return stale?.message ?? null;
}

/**
 * The build a server starts on: the current one once Ready; while a rebuild works, or after it
 * failed, the newest good build (as the spawn form offers it); null when there is none.
 */
export function startableBuild(image: ICustomNBImage): { reference: string; previous: boolean } | null {
  if (phaseOf(image) === 'Ready') {
    return image.status?.image ? { reference: image.status.image, previous: false } : null;
  }
  return image.status?.rebuildOf ? { reference: image.status.rebuildOf, previous: true } : null;
}

/** Was the image's failure a cancellation? */
export function isCancelled(image: ICustomNBImage): boolean {
  return (
    phaseOf(image) === 'Failed' &&
    (image.status?.conditions ?? []).some(c => c.reason === 'Cancelled')
  );
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

/** `spec.packageVersions[3]` → 3; anything else → null. */
export function packageIndexOf(field: string | undefined | null): number | null {
  const match = /^spec\.packageVersions\[(\d+)\]/.exec(field ?? '');
  return match ? Number(match[1]) : null;
}

/** `spec.packageVersions[3]` → the textarea line that held entry 3, or null if not a package. */
export function packageErrorLine(
  field: string | undefined | null,
  lines: IPackageLines
): number | null {
  const index = packageIndexOf(field);
  if (index === null) {
    return null;
  }
  const line = lines.lineOfPackage[index];
  return line === undefined ? null : line;
}

/** A message about one line of the packages textarea (0-based lines). */
export interface IPackageLineError {
  line: number;
  message: string;
  /** The earlier line it refers to (a duplicate's first listing). */
  relatedLine?: number | null;
}

/** `Line 2: pandas is already listed on line 1` (1-based, as the gutter numbers them). */
export function packageErrorText(error: IPackageLineError): string {
  const related =
    error.relatedLine !== null && error.relatedLine !== undefined
      ? ` on line ${error.relatedLine + 1}`
      : '';
  return `Line ${error.line + 1}: ${error.message}${related}`;
}

/**
 * A service error about a package entry → the textarea lines it names (field and relatedField
 * are 0-based indices into spec.packageVersions; blank and comment lines are skipped in
 * between). Null when the error is not about a package entry of this text.
 */
export function packageLineError(
  error: { message: string; field?: string | null; relatedField?: string | null },
  lines: IPackageLines
): IPackageLineError | null {
  const line = packageErrorLine(error.field, lines);
  if (line === null) {
    return null;
  }
  return {
    line,
    message: withoutFieldPrefix(error.message, error.field),
    relatedLine: packageErrorLine(error.relatedField, lines)
  };
}

/**
 * The message without "<field>: " in front (an older service put it there): the panel shows
 * where the message belongs, never a field path.
 */
export function withoutFieldPrefix(message: string, field?: string | null): string {
  let text = message;
  if (field) {
    while (text.startsWith(`${field}: `)) {
      text = text.slice(field.length + 2);
    }
  }
  return text.replace(/^(?:(?:spec|metadata)\.[\w.\[\]"'/-]+: )+/, '');
}

/** PEP 503 normalised project name of a requirement line, or null if it starts with none. */
export function requirementName(requirement: string): string | null {
  const match = /^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)/.exec(requirement);
  return match ? match[1].toLowerCase().replace(/[-_.]+/g, '-') : null;
}

/**
 * What can be told about the packages without the service, in the service's words: a version
 * operator with nothing after it, and a project listed twice. The first such line, or null.
 */
export function checkPackageLines(text: string): IPackageLineError | null {
  const { packages, lineOfPackage } = parsePackageLines(text);
  const seen = new Map<string, number>();
  for (let i = 0; i < packages.length; i++) {
    const requirement = packages[i].split(';')[0].trim();
    const dangling = /(===|==|>=|<=|~=|!=|<|>)\s*$/.exec(requirement);
    if (dangling) {
      return { line: lineOfPackage[i], message: `a version is missing after ${dangling[1]}` };
    }
    const name = requirementName(requirement);
    if (name === null) {
      continue; // the service names what is wrong with it
    }
    const first = seen.get(name);
    if (first !== undefined) {
      const shown = /^\s*([A-Za-z0-9._-]+)/.exec(requirement)![1];
      return {
        line: lineOfPackage[i],
        message: `${shown} is already listed`,
        relatedLine: lineOfPackage[first]
      };
    }
    seen.set(name, i);
  }
  return null;
}

/** How often an image is rebuilt on its own (picking up newer versions its requirements allow). */
export type RebuildSchedule = 'daily' | 'weekly' | 'monthly';

export interface IImageForm {
  displayName: string;
  description: string;
  buildType: BuildType;
  baseImage: string;
  packagesText: string;
  repository: string;
  gitRef: string;
  /** '' = a public repository (no token sent). */
  gitCredential: string;
  fromImage: string;
  /** '' = only when asked (or by a push, a base image update). */
  rebuildSchedule: RebuildSchedule | '';
  /** Carried over from an image edited as new (the form has no input for it). */
  runtimeEnvironment?: Record<string, string>;
}

/** The inputs of the create form a service error can belong to. */
export type FormInput = Exclude<keyof IImageForm, 'runtimeEnvironment' | 'buildType'>;

/** The form input a service error's `field` describes, or null (the error is about the whole). */
export function formInputOf(field: string | undefined | null): FormInput | null {
  if (!field) {
    return null;
  }
  if (packageIndexOf(field) !== null || field === 'spec.packageVersions') {
    return 'packagesText';
  }
  const spec: Record<string, FormInput> = {
    'spec.baseImage': 'baseImage',
    'spec.fromImage': 'fromImage',
    'spec.repository': 'repository',
    'spec.gitRef': 'gitRef',
    'spec.gitCredential': 'gitCredential',
    'spec.rebuildSchedule': 'rebuildSchedule'
  };
  if (spec[field]) {
    return spec[field];
  }
  if (field.includes(ANNOTATION_DISPLAY_NAME) || field === 'displayName') {
    return 'displayName';
  }
  if (field.includes(ANNOTATION_DESCRIPTION) || field === 'description') {
    return 'description';
  }
  return null;
}

export const EMPTY_FORM: IImageForm = {
  displayName: '',
  description: '',
  buildType: 'PackageList',
  baseImage: '',
  packagesText: '',
  repository: '',
  gitRef: '',
  gitCredential: '',
  fromImage: '',
  rebuildSchedule: ''
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
      if (form.gitCredential) {
        spec.gitCredential = form.gitCredential;
      }
    }
  }
  if (form.runtimeEnvironment && Object.keys(form.runtimeEnvironment).length) {
    spec.runtimeEnvironment = { ...form.runtimeEnvironment };
  }
  if (form.rebuildSchedule && form.buildType !== 'ImageImport') {
    spec.rebuildSchedule = form.rebuildSchedule;
  }
  return {
    apiVersion: 'meteor.zone/v1alpha1',
    kind: 'CustomNBImage',
    metadata: { annotations },
    spec
  };
}

/** "Edit as new": the create form filled from an image's spec (the name gets " (copy)"). */
export function formFromImage(image: ICustomNBImage): IImageForm {
  const spec = image.spec;
  const form: IImageForm = {
    ...EMPTY_FORM,
    displayName: `${displayNameOf(image)} (copy)`,
    description: descriptionOf(image),
    buildType: spec.buildType,
    baseImage: spec.baseImage ?? '',
    packagesText: (spec.packageVersions ?? []).join('\n'),
    repository: spec.repository ?? '',
    gitRef: spec.gitRef ?? '',
    gitCredential: spec.gitCredential ?? '',
    fromImage: spec.fromImage ?? '',
    rebuildSchedule: spec.rebuildSchedule ?? ''
  };
  if (spec.runtimeEnvironment && Object.keys(spec.runtimeEnvironment).length) {
    form.runtimeEnvironment = { ...spec.runtimeEnvironment };
  }
  return form;
}

/** "Save this environment as an image": a PackageList on the server's image. */
export function formFromEnvironment(env: IEnvironment): IImageForm {
  return {
    ...EMPTY_FORM,
    buildType: 'PackageList',
    baseImage: env.baseImage,
    packagesText: env.requirements.join('\n')
  };
}

/** Nothing to save: no package was added or changed (removals cannot be built on the base). */
export function environmentIsEmpty(env: IEnvironment): boolean {
  return !env.requirements.length && !env.added.length && !env.changed.length;
}

/** What a build-finished notification says, decided without the DOM. */
export interface IBuildNotice {
  kind: 'success' | 'error';
  name: string;
  message: string;
}

/** Phase and run of an image as last seen, to tell a transition. */
export interface IPhaseSnapshot {
  phase: Phase;
  run: number;
}

export function snapshotOf(image: ICustomNBImage): IPhaseSnapshot {
  return { phase: phaseOf(image), run: image.status?.run ?? 1 };
}

/**
 * Whether to notify that a build finished: an image this session created or rebuilt
 * (`tracked`) has just reached Ready or Failed (it was unfinished, or an earlier run, when last
 * seen), and the panel is not visible (hidden widget or hidden document).
 */
export function buildFinishedNotice(
  previous: IPhaseSnapshot | undefined,
  image: ICustomNBImage,
  options: { tracked: boolean; visible: boolean }
): IBuildNotice | null {
  const now = snapshotOf(image);
  if (!options.tracked || options.visible || !previous || !isTerminal(now.phase)) {
    return null;
  }
  const finishedNow = !isTerminal(previous.phase) || previous.run < now.run;
  if (!finishedNow) {
    return null;
  }
  const display = displayNameOf(image);
  if (now.phase === 'Ready') {
    return { kind: 'success', name: nameOf(image), message: `Image “${display}” is ready.` };
  }
  const why = (failureMessage(image) ?? '').split('\n')[0];
  return {
    kind: 'error',
    name: nameOf(image),
    message: `Image “${display}” failed${why ? `: ${why}` : '.'}`
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

/** A git credential the user stored with the service, as the API shows it (never the token). */
export interface IGitCredential {
  name: string;
  host: string;
  username: string;
  created?: string;
  updated?: string;
}

/**
 * The host (and port, when not the scheme's default) of a repository URL, as a credential names
 * it: `https://GitHub.com/org/repo` → `github.com`; '' when the text is not a URL with a host.
 */
export function repositoryHost(url: string): string {
  try {
    const parsed = new URL(url.trim());
    return parsed.host.toLowerCase();
  } catch {
    return '';
  }
}

/** A credential name for a host: `git.example.org:8443` → `git-example-org-8443`. */
export function credentialNameFor(host: string): string {
  const slug = host
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '')
    .slice(0, 63)
    .replace(/-+$/g, '');
  return slug || 'git-token';
}

/** What changed in the packages from one generation to the next (api/images/{name}/generations). */
export interface IPackageChanges {
  added: string[];
  removed: string[];
  changed: string[];
  counts: { added: number; removed: number; changed: number };
}

/** One kept build of an image: the current one or an earlier one it can go back to. */
export interface IGeneration {
  run: number;
  image: string;
  current: boolean;
  completionTime?: string;
  gitCommit?: string;
  packageCount?: number;
  changes: IPackageChanges;
  /** The run it was compared with (the generation before it), if any. */
  comparedWith?: number;
  trigger?: ITrigger;
  /** When it stopped being the current build. */
  savedAt?: string;
  /** The last server start on this build (pinned to it). */
  lastStartedAt?: string;
  /** Retention deleted its image: it is listed (packages, lock) but cannot be started. */
  removed?: { at: string; reason: string };
}

/** "2026-11-24 10:00 UTC" from an ISO time. */
export function shortTime(iso: string): string {
  return `${iso.slice(0, 16).replace('T', ' ')} UTC`;
}

/** "2 added (numpy 2.0, …) · tabulate 0.9.0 → 0.8.10"; '' when nothing changed or nothing came before. */
export function changesLabel(changes: IPackageChanges, shown = 3): string {
  const part = (names: string[], count: number, words: string) => {
    if (!count) {
      return '';
    }
    if (count === 1 && names.length === 1) {
      return words === 'changed' ? names[0] : `${words} ${names[0]}`;
    }
    const listed = names.slice(0, shown).join(', ');
    return `${count} ${words}${listed ? ` (${listed}${count > shown ? ', …' : ''})` : ''}`;
  };
  return [
    part(changes.changed, changes.counts.changed, 'changed'),
    part(changes.added, changes.counts.added, 'added'),
    part(changes.removed, changes.counts.removed, 'removed')
  ]
    .filter(Boolean)
    .join(' · ');
}

/**
 * Whether this server runs an earlier build of its image than the image's current one: the
 * server's image (by digest, as the spawner started it) is not the Ready image's `status.image`.
 * Null when it runs the current build, the image is not Ready, or the server is on another image.
 */
export function newerBuildOf(
  server: IServerInfo | null,
  image: ICustomNBImage | undefined
): { name: string; run: number } | null {
  if (!server?.cnbiImage || !server.jupyterImage || !image || nameOf(image) !== server.cnbiImage) {
    return null;
  }
  const current = image.status?.image;
  if (phaseOf(image) !== 'Ready' || !current || current === server.jupyterImage) {
    return null;
  }
  return { name: nameOf(image), run: image.status?.run ?? 1 };
}
