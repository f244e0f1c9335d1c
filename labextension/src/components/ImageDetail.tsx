import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import { LogBuffer } from '../logbuffer';
import {
  ICustomNBImage,
  buildDurationSeconds,
  descriptionOf,
  displayNameOf,
  failureMessage,
  formatDuration,
  mergeLogTail,
  nameOf,
  phaseOf
} from '../model';
import { EventSourceFactory, ImageEventStream, StreamState } from '../stream';
import { BuildProgress, PhaseBadge } from './ImageList';
import { LogView } from './LogView';

/** What the panel needs from JupyterLab, passed in so the view renders anywhere. */
export interface IPanelActions {
  confirmDelete: (displayName: string) => Promise<boolean>;
  copyToClipboard: (text: string) => void;
  openUrl: (url: string) => void;
}

export interface IImageDetailProps {
  api: CnbiApi;
  image: ICustomNBImage;
  hubPrefix: string;
  /** The hub user and whether the hub allows named servers (for the spawn link). */
  currentUser?: string;
  namedServers?: boolean;
  actions: IPanelActions;
  eventSourceFactory?: EventSourceFactory;
  /** Every new version of the object seen on the stream (the list shows it too). */
  onUpdate: (image: ICustomNBImage) => void;
  onDeleted: (name: string) => void;
  onRebuilt: (image: ICustomNBImage) => void;
}

/**
 * Where "Start a server with this image" goes. With named servers, a new server named after
 * the image (the user keeps the one this panel runs in); without, the default server's spawn
 * page, which only helps once that server is stopped.
 */
export function spawnUrl(hubPrefix: string, name: string, user?: string, namedServers?: boolean): string {
  const prefix = hubPrefix.endsWith('/') ? hubPrefix : hubPrefix + '/';
  const query = `cnbi_image=${encodeURIComponent(name)}`;
  if (namedServers && user) {
    return `${prefix}spawn/${encodeURIComponent(user)}/${encodeURIComponent(name)}?${query}`;
  }
  return `${prefix}spawn?${query}`;
}

export function ImageDetail(props: IImageDetailProps): JSX.Element {
  const { api, image, hubPrefix, currentUser, namedServers, actions, onUpdate, onDeleted, onRebuilt } = props;
  const name = nameOf(image);
  const phase = phaseOf(image);
  const [buffer] = React.useState(() => new LogBuffer());
  const [logVersion, setLogVersion] = React.useState(0);
  const [streamState, setStreamState] = React.useState<StreamState>('connecting');
  const [lock, setLock] = React.useState<string | null>(null);
  const [error, setError] = React.useState<string | null>(null);
  const [busy, setBusy] = React.useState(false);
  const onUpdateRef = React.useRef(onUpdate);
  onUpdateRef.current = onUpdate;
  const onDeletedRef = React.useRef(onDeleted);
  onDeletedRef.current = onDeleted;

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

  const remove = async () => {
    if (!(await actions.confirmDelete(displayNameOf(image)))) {
      return;
    }
    setBusy(true);
    try {
      await api.deleteImage(name);
      onDeleted(name);
    } catch (e) {
      setError((e as CnbiApiError).message);
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
      setError((e as CnbiApiError).message);
    } finally {
      setBusy(false);
    }
  };

  const failure = failureMessage(image);
  const packages = (image.status?.packages ?? []).filter(p => p.visible !== false);
  const reference = image.status?.image;

  return (
    <section className="cnbi-detail" data-testid="cnbi-detail" data-name={name}>
      <header className="cnbi-detail-head">
        <h3>{displayNameOf(image)}</h3>
        <PhaseBadge image={image} />
        {streamState === 'reconnecting' && (
          <span className="cnbi-stream-state" data-testid="cnbi-stream-state">
            reconnecting…
          </span>
        )}
      </header>
      {descriptionOf(image) && <p className="cnbi-description">{descriptionOf(image)}</p>}
      <BuildProgress image={image} />
      <p className="cnbi-detail-meta">
        <code>{name}</code> · {image.spec.buildType}
        {image.spec.baseImage && <> · from <code>{image.spec.baseImage}</code></>}
        {image.spec.fromImage && <> · <code>{image.spec.fromImage}</code></>}
        {image.spec.repository && (
          <>
            {' '}
            · <code>{image.spec.repository}</code>
            {image.spec.gitRef && <>@{image.spec.gitRef}</>}
          </>
        )}
        {buildDurationSeconds(image) !== null && (
          <> · {formatDuration(buildDurationSeconds(image))}</>
        )}
        {image.status?.reusedFrom && <> · reused the build of {image.status.reusedFrom}</>}
      </p>
      {failure && (
        <p className="cnbi-failure" data-testid="cnbi-failure" role="alert">
          {failure}
        </p>
      )}
      {error && (
        <p className="cnbi-error" role="alert">
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
            onClick={() => actions.copyToClipboard(reference)}
          >
            Copy
          </button>
        </div>
      )}
      <div className="cnbi-actions">
        <button
          className="jp-mod-styled jp-mod-accept cnbi-button"
          data-testid="cnbi-spawn"
          disabled={phase !== 'Ready'}
          onClick={() => actions.openUrl(spawnUrl(hubPrefix, name, currentUser, namedServers))}
        >
          Start a server with this image
        </button>
        <button
          className="jp-mod-styled jp-mod-reject cnbi-button"
          data-testid="cnbi-rebuild"
          disabled={busy || !['Ready', 'Failed'].includes(phase)}
          onClick={rebuild}
        >
          Rebuild
        </button>
        <button
          className="jp-mod-styled jp-mod-warn cnbi-button"
          data-testid="cnbi-delete"
          disabled={busy}
          onClick={remove}
        >
          Delete
        </button>
      </div>
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
