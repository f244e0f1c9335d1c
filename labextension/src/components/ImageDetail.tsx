import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import { LogBuffer } from '../logbuffer';
import {
  ICustomNBImage,
  IGeneration,
  IUserInfo,
  baseFailedMessage,
  changesLabel,
  descriptionOf,
  displayNameOf,
  durationLabel,
  failureMessage,
  formatBytes,
  isTerminal,
  mayChange,
  mergeLogTail,
  nameOf,
  phaseProgress,
  runLabel,
  shortTime,
  startableBuild,
  triggerLabel,
  withoutFieldPrefix
} from '../model';
import { EventSourceFactory, ImageEventStream, StreamState } from '../stream';
import { BuildProgress, PhaseBadge } from './ImageList';
import { LogView } from './LogView';
import { SharePanel } from './SharePanel';

/** How long the copy button says "Copied". */
export const COPIED_MS = 2000;

/** A notification for the user (JupyterLab's Notification in the Lab). */
export interface IPanelNotice {
  kind: 'success' | 'error';
  message: string;
  /** A button on the notification that opens a URL, e.g. "Start a server". */
  action?: { label: string; url: string };
}

/** What the panel needs from JupyterLab, passed in so the view renders anywhere. */
export interface IPanelActions {
  /** `builtOnIt`: the display names of the images built on this one (`cnbi:<name>`). */
  confirmDelete: (displayName: string, builtOnIt?: string[]) => Promise<boolean>;
  copyToClipboard: (text: string) => void;
  openUrl: (url: string) => void;
  /** Say that a build finished (while the panel is not visible). */
  notify: (notice: IPanelNotice) => void;
  /** "Restart this server on run N of the image?" (the server stops: unsaved work is lost). */
  confirmRestart: (displayName: string, run: number) => Promise<boolean>;
  /** Leave this page for `url` (the hub's spawn page, once the server is asked to stop). */
  navigate: (url: string) => void;
}

export interface IImageDetailProps {
  api: CnbiApi;
  /** Display names of the listed images built on this one: the delete dialog names them. */
  builtOnIt?: string[];
  image: ICustomNBImage;
  hubPrefix: string;
  /** The hub user and whether the hub allows named servers (for the spawn link). */
  currentUser?: string;
  namedServers?: boolean;
  /** Who looks: admins and the owner may share the image. */
  user?: IUserInfo;
  actions: IPanelActions;
  eventSourceFactory?: EventSourceFactory;
  /** Every new version of the object seen on the stream (the list shows it too). */
  onUpdate: (image: ICustomNBImage) => void;
  onDeleted: (name: string) => void;
  onRebuilt: (image: ICustomNBImage) => void;
  /** "Edit as new": open the create form filled from this image. */
  onEditAsNew?: (image: ICustomNBImage) => void;
  /** Another image of the list by name (for "Reused the build of …"). */
  lookup?: (name: string) => ICustomNBImage | undefined;
}

/** The phases in which a build can still be cancelled. */
export const CANCELLABLE = ['Pending', 'Prepare', 'Resolving', 'Building'];

/**
 * Where "Start a server with this image" goes. With named servers, a new server named after
 * the image (the user keeps the one this panel runs in); without, the default server's spawn
 * page, which only helps once that server is stopped. The hub wants spawn options as `opt-…`.
 */
export function spawnUrl(
  hubPrefix: string,
  name: string,
  user?: string,
  namedServers?: boolean,
  run?: number
): string {
  const prefix = hubPrefix.endsWith('/') ? hubPrefix : hubPrefix + '/';
  let query = `opt-cnbi_image=${encodeURIComponent(name)}`;
  // a kept earlier build (cnbi_build): its own named server, beside one on the current build
  const server = run === undefined ? name : `${name}-run-${run}`;
  if (run !== undefined) {
    query += `&opt-cnbi_build=${run}`;
  }
  if (namedServers && user) {
    return `${prefix}spawn/${encodeURIComponent(user)}/${encodeURIComponent(server)}?${query}`;
  }
  return `${prefix}spawn?${query}`;
}

export function ImageDetail(props: IImageDetailProps): JSX.Element {
  const {
    api,
    image,
    hubPrefix,
    currentUser,
    namedServers,
    user,
    actions,
    onUpdate,
    onDeleted,
    onRebuilt,
    onEditAsNew,
    lookup,
    builtOnIt
  } = props;
  const name = nameOf(image);
  // One source for the badge, the bar and the buttons: the phase of this version of the object.
  const progress = phaseProgress(image);
  const phase = progress.phase;
  const [buffer] = React.useState(() => new LogBuffer());
  const [logVersion, setLogVersion] = React.useState(0);
  const [streamState, setStreamState] = React.useState<StreamState>('connecting');
  const [lock, setLock] = React.useState<string | null>(null);
  const [error, setError] = React.useState<string | null>(null);
  const [busy, setBusy] = React.useState(false);
  // How many times the reference was copied; 0 once the "Copied" note went away.
  const [copied, setCopied] = React.useState(0);
  const [now, setNow] = React.useState(Date.now());
  const onUpdateRef = React.useRef(onUpdate);
  onUpdateRef.current = onUpdate;
  const onDeletedRef = React.useRef(onDeleted);
  onDeletedRef.current = onDeleted;

  const running = !isTerminal(phase);
  React.useEffect(() => {
    if (!running) {
      return;
    }
    setNow(Date.now());
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, [running]);

  React.useEffect(() => {
    if (!copied) {
      return;
    }
    const timer = setTimeout(() => setCopied(0), COPIED_MS);
    return () => clearTimeout(timer);
  }, [copied]);

  // One stream per shown image: the object as it changes, and the build log as it grows.
  React.useEffect(() => {
    buffer.replace([]);
    setLogVersion(v => v + 1);
    let pending: string[] | null = null;
    let live = true;
    const loadLog = () => {
      // Lines that arrive while the log so far is fetched are merged after it.
      pending = [];
      api.getLogs(name).then(
        text => {
          if (!live || pending === null) {
            return;
          }
          const fetched = text ? text.replace(/\n$/, '').split('\n') : [];
          buffer.replace(mergeLogTail(fetched, pending));
          pending = null;
          setLogVersion(v => v + 1);
        },
        () => {
          if (live && pending !== null) {
            buffer.append(pending);
            pending = null;
            setLogVersion(v => v + 1);
          }
        }
      );
    };
    const stream = new ImageEventStream({
      url: api.eventsUrl(name),
      eventSourceFactory: props.eventSourceFactory,
      handlers: {
        object: obj => onUpdateRef.current(obj),
        log: line => {
          if (pending !== null) {
            pending.push(line);
          } else {
            buffer.append([line]);
            setLogVersion(v => v + 1);
          }
        },
        deleted: () => onDeletedRef.current(name),
        state: state => {
          setStreamState(state);
          if (state === 'open') {
            loadLog();
          }
        }
      }
    });
    return () => {
      live = false;
      stream.close();
    };
  }, [api, name]);

  const hasLock = !!image.status?.lockHash || phase === 'Ready';
  React.useEffect(() => {
    if (!hasLock || image.spec.buildType === 'ImageImport') {
      setLock(null);
      return;
    }
    let live = true;
    api.getLock(name).then(
      text => live && setLock(text),
      () => live && setLock(null)
    );
    return () => {
      live = false;
    };
  }, [api, name, hasLock, image.status?.lockHash]);

  // The kept builds: asked again whenever a run ends (a new build, a rollback).
  const [generations, setGenerations] = React.useState<IGeneration[]>([]);
  const runNumber = image.status?.run ?? 1;
  React.useEffect(() => {
    if (image.spec.buildType === 'ImageImport' && runNumber === 1) {
      setGenerations([]);
      return;
    }
    let live = true;
    api.generations(name).then(
      result => live && setGenerations(result.items),
      () => live && setGenerations([])
    );
    return () => {
      live = false;
    };
  }, [api, name, runNumber, phase === 'Ready']);

  const makeCurrent = async (run: number, rebuild = false) => {
    setBusy(true);
    setError(null);
    try {
      onUpdate(await api.rollback(name, run, rebuild));
    } catch (e) {
      setError(withoutFieldPrefix((e as CnbiApiError).message));
    } finally {
      setBusy(false);
    }
  };

  const remove = async () => {
    if (!(await actions.confirmDelete(displayNameOf(image), builtOnIt ?? []))) {
      return;
    }
    setBusy(true);
    try {
      await api.deleteImage(name);
      onDeleted(name);
    } catch (e) {
      setError(withoutFieldPrefix((e as CnbiApiError).message));
    } finally {
      setBusy(false);
    }
  };

  const rebuild = async () => {
    setBusy(true);
    setError(null);
    try {
      onRebuilt(await api.rebuildImage(name));
    } catch (e) {
      setError(withoutFieldPrefix((e as CnbiApiError).message));
    } finally {
      setBusy(false);
    }
  };

  const cancel = async () => {
    setBusy(true);
    setError(null);
    try {
      onUpdate(await api.cancelImage(name));
    } catch (e) {
      setError(withoutFieldPrefix((e as CnbiApiError).message));
      // 409: it finished meanwhile; show how.
      api.getImage(name).then(
        obj => onUpdateRef.current(obj),
        () => undefined
      );
    } finally {
      setBusy(false);
    }
  };

  const copy = (text: string) => {
    actions.copyToClipboard(text);
    setCopied(c => c + 1); // a new timer for every click
  };

  const failure = failureMessage(image);
  const packages = (image.status?.packages ?? []).filter(p => p.visible !== false);
  const reference = image.status?.image;
  const run = image.status?.run ?? 1;
  const runs = image.status?.runs ?? [];
  const triggers = [...(image.status?.triggers ?? [])].reverse(); // newest first
  const pendingPush = image.status?.rebuildAfter;
  const baseFailed = baseFailedMessage(image);
  const startable = startableBuild(image);
  const duration = durationLabel(image, now);
  const size = phase === 'Ready' ? formatBytes(image.status?.imageSize) : '';
  const reusedFrom = image.status?.reusedFrom;
  const reused = reusedFrom ? lookup?.(reusedFrom) : undefined;
  // Someone else's image shared with me: I may start it or copy it, not change it.
  const changeable = mayChange(image, user);

  return (
    <section className="cnbi-detail" data-testid="cnbi-detail" data-name={name}>
      <header className="cnbi-detail-head">
        <h3>{displayNameOf(image)}</h3>
        <PhaseBadge progress={progress} />
        {streamState === 'reconnecting' && (
          <span className="cnbi-stream-state" data-testid="cnbi-stream-state">
            reconnecting…
          </span>
        )}
      </header>
      {descriptionOf(image) && <p className="cnbi-description">{descriptionOf(image)}</p>}
      <BuildProgress progress={progress} />
      <p className="cnbi-detail-meta">
        <code>{name}</code> · {image.spec.buildType}
        {image.spec.baseImage && <> · from <code>{image.spec.baseImage}</code></>}
        {image.spec.fromImage && <> · <code>{image.spec.fromImage}</code></>}
        {image.spec.repository && (
          <>
            {' '}
            · <code>{image.spec.repository}</code>
            {image.spec.gitRef && <>@{image.spec.gitRef}</>}
            {image.spec.gitCredential && (
              <span data-testid="cnbi-credential-name"> · with the token {image.spec.gitCredential}</span>
            )}
          </>
        )}
        {image.spec.rebuildSchedule && (
          <span data-testid="cnbi-schedule"> · rebuilt {image.spec.rebuildSchedule}</span>
        )}
      </p>
      {(duration || size) && (
        <p className="cnbi-detail-meta cnbi-detail-stats">
          {run > 1 && <span data-testid="cnbi-run">Run {run} · </span>}
          {duration && (
            <span className="cnbi-duration" data-testid="cnbi-duration">
              {duration}
            </span>
          )}
          {duration && size && ' · '}
          {size && (
            <span className="cnbi-image-size" data-testid="cnbi-image-size" title={`${image.status?.imageSize} bytes`}>
              {size}
            </span>
          )}
        </p>
      )}
      {reusedFrom && (
        <p className="cnbi-detail-meta" data-testid="cnbi-reused">
          Reused the build of {reused ? displayNameOf(reused) : reusedFrom}
        </p>
      )}
      {failure && (
        <p className="cnbi-failure cnbi-failure-detail" data-testid="cnbi-failure" role="alert">
          {failure}
        </p>
      )}
      {error && (
        <p className="cnbi-error" data-testid="cnbi-action-error" role="alert">
          {error}
        </p>
      )}
      {reference && (
        <div className="cnbi-image-ref">
          <label htmlFor={`cnbi-ref-${name}`}>Image</label>
          <input
            id={`cnbi-ref-${name}`}
            className="jp-mod-styled"
            data-testid="cnbi-image-ref"
            readOnly
            value={reference}
          />
          <button
            className="jp-mod-styled jp-mod-reject cnbi-button"
            data-testid="cnbi-copy-ref"
            title="Copy the image reference"
            onClick={() => copy(reference)}
          >
            Copy
          </button>
          {copied > 0 && (
            <span className="cnbi-copied" data-testid="cnbi-copied" role="status">
              Copied
            </span>
          )}
        </div>
      )}
      <div className="cnbi-actions">
        <button
          className="jp-mod-styled jp-mod-accept cnbi-button"
          data-testid="cnbi-spawn"
          disabled={!startable}
          title={startable?.previous ? `Starts on ${startable.reference}` : undefined}
          onClick={() => actions.openUrl(spawnUrl(hubPrefix, name, currentUser, namedServers))}
        >
          {startable?.previous ? 'Start a server on the previous build' : 'Start a server with this image'}
        </button>
        {changeable && CANCELLABLE.includes(phase) && (
          <button
            className="jp-mod-styled jp-mod-warn cnbi-button"
            data-testid="cnbi-cancel"
            disabled={busy}
            onClick={cancel}
          >
            Cancel build
          </button>
        )}
        {changeable && (
          <button
            className="jp-mod-styled jp-mod-reject cnbi-button"
            data-testid="cnbi-rebuild"
            disabled={busy || !isTerminal(phase)}
            onClick={rebuild}
          >
            Rebuild
          </button>
        )}
        {onEditAsNew && (
          <button
            className={
              'jp-mod-styled cnbi-button ' +
              (phase === 'Failed' ? 'jp-mod-accept' : 'jp-mod-reject')
            }
            data-testid="cnbi-edit-as-new"
            title="Open a new image form filled with this image's settings"
            onClick={() => onEditAsNew(image)}
          >
            Edit as new
          </button>
        )}
        {changeable && (
          <button
            className="jp-mod-styled jp-mod-warn cnbi-button"
            data-testid="cnbi-delete"
            disabled={busy}
            onClick={remove}
          >
            Delete
          </button>
        )}
      </div>
      {user && <SharePanel api={api} image={image} user={user} onUpdate={onUpdate} />}
      {pendingPush && (
        <p className="cnbi-detail-meta" data-testid="cnbi-rebuild-after">
          {triggerLabel(pendingPush)} came during this run: the image is rebuilt
          {pendingPush.kind === 'webhook' ? ' at that commit' : ' on it'} when it ends.
        </p>
      )}
      {baseFailed && (
        <p className="cnbi-detail-meta cnbi-base-failed" data-testid="cnbi-base-failed">
          Not rebuilt: {baseFailed}
        </p>
      )}
      {triggers.length > 0 && (
        <div className="cnbi-runs" data-testid="cnbi-triggers">
          <h4>Rebuilds</h4>
          <ul>
            {triggers.map((t, i) => (
              <li key={`${t.at ?? ''}-${i}`} data-kind={t.kind}>
                {triggerLabel(t)}
              </li>
            ))}
          </ul>
        </div>
      )}
      {generations.length > 1 && (
        <div className="cnbi-runs cnbi-generations" data-testid="cnbi-generations">
          <h4>Builds you can go back to</h4>
          <ul>
            {generations.map(g => {
              const changed = g.comparedWith ? changesLabel(g.changes) : '';
              return (
                <li key={g.run} data-run={g.run} data-current={g.current} data-removed={!!g.removed}>
                  <span>
                    Run {g.run}
                    {g.current && <strong> · current</strong>}
                    {g.completionTime && <> · {shortTime(g.completionTime)}</>}
                    {g.comparedWith !== undefined && (
                      <span className="cnbi-changes" data-testid="cnbi-generation-changes">
                        {' · '}
                        {changed ? `${changed} since run ${g.comparedWith}` : `same packages as run ${g.comparedWith}`}
                      </span>
                    )}
                    {g.lastStartedAt && !g.current && <> · last started {shortTime(g.lastStartedAt)}</>}
                    {g.removed && (
                      <span className="cnbi-generation-removed" data-testid="cnbi-generation-removed">
                        {' · '}image removed {shortTime(g.removed.at)}: {g.removed.reason}
                      </span>
                    )}
                  </span>
                  {!g.current && !g.removed && (
                    <button
                      type="button"
                      className="jp-Button jp-mod-styled cnbi-small-button"
                      data-testid="cnbi-start-build"
                      title={`Start a server on run ${g.run}'s build (${g.image}), pinned to it`}
                      onClick={() => actions.openUrl(spawnUrl(hubPrefix, name, currentUser, namedServers, g.run))}
                    >
                      Start a server on it
                    </button>
                  )}
                  {g.removed && changeable && (
                    <button
                      type="button"
                      className="jp-Button jp-mod-styled cnbi-small-button"
                      data-testid="cnbi-build-again"
                      disabled={busy || running}
                      title={`Build run ${g.run} again: its commit, its base image by digest and its lock, as it was`}
                      onClick={() => void makeCurrent(g.run, true)}
                    >
                      Build it again
                    </button>
                  )}
                  {!g.current && !g.removed && changeable && (
                    <button
                      type="button"
                      className="jp-Button jp-mod-styled cnbi-small-button"
                      data-testid="cnbi-make-current"
                      disabled={busy || running}
                      title={`Start servers on run ${g.run}'s build again (${g.image}); no build runs, and the current build is kept`}
                      onClick={() => void makeCurrent(g.run)}
                    >
                      Make current
                    </button>
                  )}
                </li>
              );
            })}
          </ul>
        </div>
      )}
      {runs.length > 0 && (
        <div className="cnbi-runs" data-testid="cnbi-runs">
          <h4>Earlier runs</h4>
          <ul>
            {runs.map(r => (
              <li key={r.run} data-run={r.run}>
                {runLabel(r)}
              </li>
            ))}
          </ul>
        </div>
      )}
      <h4>Build log</h4>
      <LogView buffer={buffer} version={logVersion} fullLogUrl={api.logsUrl(name)} />
      {packages.length > 0 && (
        <>
          <h4>Packages</h4>
          <table className="cnbi-packages-table" data-testid="cnbi-packages-table">
            <thead>
              <tr>
                <th scope="col">Package</th>
                <th scope="col">Version</th>
              </tr>
            </thead>
            <tbody>
              {packages.map(p => (
                <tr key={p.name}>
                  <td>{p.name}</td>
                  <td>{p.version}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
      {lock !== null && (
        <details className="cnbi-lock">
          <summary>Resolved lock</summary>
          <pre data-testid="cnbi-lock">{lock}</pre>
        </details>
      )}
    </section>
  );
}
