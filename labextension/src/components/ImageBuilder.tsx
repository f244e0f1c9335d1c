import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import { ICustomNBImage, isTerminal, nameOf, phaseOf } from '../model';
import { EventSourceFactory, ImageEventStream } from '../stream';
import { CreateForm } from './CreateForm';
import { IPanelActions, ImageDetail } from './ImageDetail';
import { ImageList } from './ImageList';

/**
 * Browsers allow about six HTTP/1.1 connections per host; every open event stream holds one.
 * The list follows at most this many unfinished images (the detail view adds one more).
 */
export const MAX_LIST_STREAMS = 3;

export interface IImageBuilderProps {
  api: CnbiApi;
  hubPrefix: string;
  currentUser: string;
  actions: IPanelActions;
  eventSourceFactory?: EventSourceFactory;
}

function newerOf(a: ICustomNBImage, b: ICustomNBImage): ICustomNBImage {
  const va = Number(a.metadata.resourceVersion ?? 0);
  const vb = Number(b.metadata.resourceVersion ?? 0);
  return vb >= va ? b : a;
}

export function ImageBuilder(props: IImageBuilderProps): JSX.Element {
  const { api, hubPrefix, currentUser, actions, eventSourceFactory } = props;
  const [images, setImages] = React.useState<ICustomNBImage[]>([]);
  const [loadError, setLoadError] = React.useState<string | null>(null);
  const [selected, setSelected] = React.useState<string | null>(null);
  const [creating, setCreating] = React.useState(false);
  const [namedServers, setNamedServers] = React.useState(false);

  const upsert = React.useCallback((image: ICustomNBImage) => {
    setImages(list => {
      const index = list.findIndex(i => nameOf(i) === nameOf(image));
      if (index < 0) {
        return [image, ...list];
      }
      const next = list.slice();
      next[index] = newerOf(list[index], image);
      return next;
    });
  }, []);

  const remove = React.useCallback((name: string) => {
    setImages(list => list.filter(i => nameOf(i) !== name));
    setSelected(s => (s === name ? null : s));
  }, []);

  React.useEffect(() => {
    api.serviceSettings().then(
      settings => setNamedServers(!!settings.namedServers),
      () => setNamedServers(false) // an older service: the default server's spawn page
    );
  }, [api]);

  React.useEffect(() => {
    api.listImages().then(
      result => setImages(result.items),
      (error: CnbiApiError) => setLoadError(error.message)
    );
  }, [api]);

  // Live rows: a stream for each unfinished image (up to the cap), closed once it finishes.
  const followed = images
    .filter(i => !isTerminal(phaseOf(i)) && nameOf(i) !== selected)
    .slice(0, MAX_LIST_STREAMS)
    .map(nameOf);
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

  return (
    <div className="cnbi-builder" data-testid="cnbi-builder">
      <div className="cnbi-sidebar">
        <div className="cnbi-toolbar">
          <h2>Image Builder</h2>
          <button
            className="jp-mod-styled jp-mod-accept cnbi-button"
            data-testid="cnbi-new-image"
            onClick={() => setCreating(true)}
          >
            New image
          </button>
        </div>
        {loadError && (
          <p className="cnbi-error" role="alert" data-testid="cnbi-load-error">
            {loadError}
          </p>
        )}
        <ImageList
          images={images}
          selected={selected}
          currentUser={currentUser}
          onSelect={name => {
            setSelected(name);
            setCreating(false);
          }}
        />
      </div>
      <div className="cnbi-main">
        {creating || !current ? (
          <CreateForm
            api={api}
            onCreated={image => {
              upsert(image);
              setCreating(false);
              setSelected(nameOf(image));
            }}
            onCancel={current ? () => setCreating(false) : undefined}
          />
        ) : (
          <ImageDetail
            key={nameOf(current)}
            api={api}
            image={current}
            hubPrefix={hubPrefix}
            currentUser={currentUser}
            namedServers={namedServers}
            actions={actions}
            eventSourceFactory={eventSourceFactory}
            onUpdate={upsert}
            onDeleted={remove}
            onRebuilt={image => {
              upsert(image);
              setSelected(nameOf(image));
            }}
          />
        )}
      </div>
    </div>
  );
}
