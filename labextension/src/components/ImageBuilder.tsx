import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import {
  ICustomNBImage,
  IEnvironment,
  IImageForm,
  IPhaseSnapshot,
  IServerInfo,
  IUserInfo,
  buildFinishedNotice,
  displayNameOf,
  editAsNewNotice,
  environmentIsEmpty,
  formFromEnvironment,
  formFromImage,
  isTerminal,
  mergeImages,
  newerBuildOf,
  nameOf,
  phaseOf,
  snapshotOf,
  upsertImage,
  withoutFieldPrefix
} from '../model';
import { EventSourceFactory, ImageEventStream } from '../stream';
import { CreateForm } from './CreateForm';
import { EnvironmentView } from './EnvironmentView';
import { IPanelActions, ImageDetail, spawnUrl } from './ImageDetail';
import { ImageList } from './ImageList';

/**
 * Browsers allow about six HTTP/1.1 connections per host; every open event stream holds one.
 * The list follows at most this many unfinished images (the detail view adds one more).
 */
export const MAX_LIST_STREAMS = 3;


/** Something asked of the panel from outside (a command): each new `seq` is done once. */
export type PanelRequest =
  | { seq: number; kind: 'select'; name: string }
  | { seq: number; kind: 'saveEnvironment' };

export interface IImageBuilderProps {
  api: CnbiApi;
  hubPrefix: string;
  /** The hub user's name (PageConfig hubUser), used when the service does not say. */
  currentUser: string;
  actions: IPanelActions;
  eventSourceFactory?: EventSourceFactory;
  request?: PanelRequest;
  /** Whether the user can see the panel now (build-finished notifications only when not). */
  isVisible?: () => boolean;
}

/** What the main area shows. */
type MainView =
  | { kind: 'detail' }
  | { kind: 'create'; initial?: IImageForm; notice?: string }
  | { kind: 'environment'; environment?: IEnvironment; message?: string };

function documentVisible(): boolean {
  return typeof document === 'undefined' || document.visibilityState !== 'hidden';
}

export function ImageBuilder(props: IImageBuilderProps): JSX.Element {
  const { api, hubPrefix, currentUser, actions, eventSourceFactory, request } = props;
  const [images, setImages] = React.useState<ICustomNBImage[]>([]);
  const [loadError, setLoadError] = React.useState<string | null>(null);
  const [selected, setSelected] = React.useState<string | null>(null);
  const [view, setView] = React.useState<MainView>({ kind: 'detail' });
  // Every opening of the form is a new form: nothing of the last one carries over.
  const [formSeq, setFormSeq] = React.useState(0);
  const [namedServers, setNamedServers] = React.useState(false);
  const [serviceUser, setServiceUser] = React.useState<IUserInfo | null>(null);
  const user = React.useMemo<IUserInfo>(
    () => serviceUser ?? { name: currentUser, admin: false, groups: [] },
    [serviceUser, currentUser]
  );
  const isVisibleRef = React.useRef(props.isVisible ?? documentVisible);
  isVisibleRef.current = props.isVisible ?? documentVisible;
  const actionsRef = React.useRef(actions);
  actionsRef.current = actions;

  const upsert = React.useCallback((image: ICustomNBImage) => {
    setImages(list => upsertImage(list, image));
  }, []);

  const remove = React.useCallback((name: string) => {
    setImages(list => list.filter(i => nameOf(i) !== name));
    setSelected(s => (s === name ? null : s));
  }, []);

  // What this server runs on: a newer build of that image is worth a notice.
  const [serverInfo, setServerInfo] = React.useState<IServerInfo | null>(null);
  const [restartError, setRestartError] = React.useState<string | null>(null);
  const [restarting, setRestarting] = React.useState(false);
  React.useEffect(() => {
    api.serverInfo().then(
      info => {
        setServerInfo(info);
        if (info.cnbiImage) {
          api.getImage(info.cnbiImage).then(upsert, () => undefined);
        }
      },
      () => setServerInfo(null) // an older server extension: no notice
    );
  }, [api]);

  React.useEffect(() => {
    api.serviceSettings().then(
      settings => {
        setNamedServers(!!settings.namedServers);
        if (settings.user?.name) {
          setServiceUser({
            name: settings.user.name,
            admin: !!settings.user.admin,
            groups: settings.user.groups ?? []
          });
        }
      },
      () => setNamedServers(false) // an older service: the default server's spawn page
    );
  }, [api]);

  React.useEffect(() => {
    api.listImages().then(
      // merged with what streams or a request added meanwhile; one order, newest first
      result => setImages(list => mergeImages(list, result.items)),
      (error: CnbiApiError) => setLoadError(withoutFieldPrefix(error.message))
    );
  }, [api]);

  // Build-finished notifications: images created or rebuilt in this session.
  const tracked = React.useRef(new Set<string>());
  const snapshots = React.useRef(new Map<string, IPhaseSnapshot>());
  React.useEffect(() => {
    const visible = isVisibleRef.current();
    for (const image of images) {
      const name = nameOf(image);
      const previous = snapshots.current.get(name);
      const notice = buildFinishedNotice(previous, image, {
        tracked: tracked.current.has(name),
        visible
      });
      if (notice) {
        actionsRef.current.notify({
          kind: notice.kind,
          message: notice.message,
          action:
            notice.kind === 'success'
              ? { label: 'Start a server', url: spawnUrl(hubPrefix, name, user.name, namedServers) }
              : undefined
        });
      }
      const now = snapshotOf(image);
      if (isTerminal(now.phase) && (!previous || !isTerminal(previous.phase) || previous.run < now.run)) {
        tracked.current.delete(name); // finished: notified or seen
      }
      snapshots.current.set(name, now);
    }
  }, [images]);

  const track = (image: ICustomNBImage) => {
    tracked.current.add(nameOf(image));
  };

  const openForm = (initial?: IImageForm, notice?: string) => {
    setFormSeq(n => n + 1);
    setView({ kind: 'create', initial, notice });
  };

  const saveEnvironment = React.useCallback(async () => {
    setView({ kind: 'environment' });
    let message: string;
    try {
      const environment = await api.environment();
      if (!environmentIsEmpty(environment)) {
        setView(v => (v.kind === 'environment' ? { kind: 'environment', environment } : v));
        return;
      }
      message =
        'Nothing was installed in this server since it started: there is nothing to save ' +
        'beyond the image it runs on.';
    } catch (e) {
      const error = e as CnbiApiError;
      message =
        error.status === 409
          ? `This server’s environment cannot be saved: ${withoutFieldPrefix(error.message)}`
          : `Could not read this server’s environment: ${withoutFieldPrefix(error.message)}`;
    }
    setView(v => (v.kind === 'environment' ? { kind: 'environment', message } : v));
  }, [api]);

  // Requests from commands: select an image (status bar), save the environment (palette).
  React.useEffect(() => {
    if (!request) {
      return;
    }
    if (request.kind === 'saveEnvironment') {
      void saveEnvironment();
      return;
    }
    const name = request.name;
    setSelected(name);
    setView({ kind: 'detail' });
    // Not listed (yet)? Fetch it: it may be shared, or the list still loading.
    api.getImage(name).then(upsert, () => undefined);
  }, [request?.seq]);

  // Live rows: a stream for each unfinished image (up to the cap), closed once it finishes;
  // the builds of this session first, so that their end is noticed (and notified). The image
  // this server runs is always followed: a new build of it (a push, a rollback) shows at once.
  const runningOn = serverInfo?.cnbiImage ?? null;
  const followed = images
    .filter(i => !isTerminal(phaseOf(i)) && nameOf(i) !== selected && nameOf(i) !== runningOn)
    .sort((a, b) => Number(tracked.current.has(nameOf(b))) - Number(tracked.current.has(nameOf(a))))
    .slice(0, MAX_LIST_STREAMS)
    .map(nameOf)
    .concat(runningOn && runningOn !== selected ? [runningOn] : []);
  const followedKey = followed.join('\n');
  const streams = React.useRef(new Map<string, ImageEventStream>());
  React.useEffect(() => {
    const wanted = new Set(followed);
    for (const [name, stream] of streams.current) {
      if (!wanted.has(name)) {
        stream.close();
        streams.current.delete(name);
      }
    }
    for (const name of wanted) {
      if (!streams.current.has(name)) {
        streams.current.set(
          name,
          new ImageEventStream({
            url: api.eventsUrl(name),
            eventSourceFactory,
            handlers: { object: upsert, deleted: () => remove(name) }
          })
        );
      }
    }
  }, [followedKey, api]);
  React.useEffect(
    () => () => {
      streams.current.forEach(s => s.close());
      streams.current.clear();
    },
    []
  );

  const current = images.find(i => nameOf(i) === selected) ?? null;
  const runningImage = runningOn ? images.find(i => nameOf(i) === runningOn) : undefined;
  const newer = newerBuildOf(serverInfo, runningImage);
  const restart = async () => {
    if (!newer || !(await actionsRef.current.confirmRestart(displayNameOf(runningImage!), newer.run))) {
      return;
    }
    setRestarting(true);
    setRestartError(null);
    try {
      // the service's page waits until the hub has stopped this server, then starts it again
      const { nextUrl } = await api.restartServer();
      actionsRef.current.navigate(nextUrl);
    } catch (e) {
      setRestartError(withoutFieldPrefix((e as CnbiApiError).message));
      setRestarting(false);
    }
  };
  const lookup = React.useCallback(
    (name: string) => images.find(i => nameOf(i) === name),
    [images]
  );

  let main: JSX.Element;
  if (view.kind === 'environment') {
    main = (
      <EnvironmentView
        environment={view.environment}
        message={view.message}
        onConfirm={environment =>
          openForm(
            formFromEnvironment(environment),
            `From this server: the packages installed in it, on ${environment.baseImage}.`
          )
        }
        onCancel={() => setView({ kind: 'detail' })}
      />
    );
  } else if (view.kind === 'create' || !current) {
    const form = view.kind === 'create' ? view : undefined;
    main = (
      <CreateForm
        key={formSeq}
        api={api}
        stackable={images}
        initial={form?.initial}
        notice={form?.notice}
        onCreated={image => {
          track(image);
          upsert(image);
          setSelected(nameOf(image));
          setFormSeq(n => n + 1);
          setView({ kind: 'detail' });
        }}
        onCancel={current ? () => setView({ kind: 'detail' }) : undefined}
      />
    );
  } else {
    main = (
      <ImageDetail
        key={nameOf(current)}
        api={api}
        builtOnIt={images
          .filter(other => other.spec.baseImage === `cnbi:${nameOf(current)}`)
          .map(other => displayNameOf(other))}
        image={current}
        hubPrefix={hubPrefix}
        currentUser={user.name}
        namedServers={namedServers}
        user={user}
        actions={actions}
        eventSourceFactory={eventSourceFactory}
        onUpdate={upsert}
        onDeleted={remove}
        onRebuilt={image => {
          track(image);
          upsert(image);
          setSelected(nameOf(image));
        }}
        onEditAsNew={image => openForm(formFromImage(image), editAsNewNotice(image))}
        lookup={lookup}
      />
    );
  }

  return (
    <div className="cnbi-builder" data-testid="cnbi-builder">
      <div className="cnbi-sidebar">
        <div className="cnbi-toolbar">
          <h2>Image Builder</h2>
          <div className="cnbi-toolbar-buttons">
            <button
              className="jp-mod-styled jp-mod-reject cnbi-button"
              data-testid="cnbi-save-env"
              title="Save the packages installed in this server as a new image"
              onClick={() => void saveEnvironment()}
            >
              Save environment
            </button>
            <button
              className="jp-mod-styled jp-mod-accept cnbi-button"
              data-testid="cnbi-new-image"
              onClick={() => openForm()}
            >
              New image
            </button>
          </div>
        </div>
        {newer && (
          <div className="cnbi-newer-build" role="status" data-testid="cnbi-newer-build">
            <p>
              A newer build of <strong>{displayNameOf(runningImage!)}</strong> is ready (run {newer.run}):
              this server runs an earlier one.
            </p>
            <button
              className="jp-mod-styled jp-mod-accept cnbi-button"
              data-testid="cnbi-restart-on-newer"
              disabled={restarting}
              onClick={() => void restart()}
            >
              {restarting ? 'Restarting…' : 'Restart on it'}
            </button>
            {restartError && (
              <p className="cnbi-error" role="alert">
                {restartError}
              </p>
            )}
          </div>
        )}
        {loadError && (
          <p className="cnbi-error" role="alert" data-testid="cnbi-load-error">
            {loadError}
          </p>
        )}
        <ImageList
          images={images}
          selected={selected}
          user={user}
          onSelect={name => {
            setSelected(name);
            setView({ kind: 'detail' });
          }}
        />
      </div>
      <div className="cnbi-main">{main}</div>
    </div>
  );
}
