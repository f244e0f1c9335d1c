import { closeIcon } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CnbiApi, CnbiApiError, IImagePatch } from '../api';
import {
  ICustomNBImage,
  IUserInfo,
  creatorOf,
  isShared,
  nameOf,
  sharedGroupsOf,
  withoutFieldPrefix
} from '../model';

export interface ISharePanelProps {
  api: CnbiApi;
  image: ICustomNBImage;
  user: IUserInfo;
  onUpdate: (image: ICustomNBImage) => void;
}

/** Group names typed in the input: comma-separated, trimmed, without duplicates. */
export function parseGroupNames(text: string): string[] {
  return [...new Set(text.split(',').map(g => g.trim()).filter(g => g))];
}

/**
 * The hint under an owner's group input: which of their groups they can still share with, or
 * why the typed names cannot be shared with (`wanted`: typed, not yet shared).
 */
export function ownerShareHint(userGroups: string[], sharedGroups: string[], wanted: string[]): string {
  const foreign = wanted.filter(g => !userGroups.includes(g));
  if (foreign.length) {
    return `You are not in ${foreign.join(', ')}: you can share with ${userGroups.join(', ')}.`;
  }
  const remaining = userGroups.filter(g => !sharedGroups.includes(g));
  if (!remaining.length) {
    return 'It is shared with all your groups.';
  }
  const also = remaining.length < userGroups.length ? 'also ' : '';
  return `You can ${also}share with your groups: ${remaining.join(', ')}.`;
}

/**
 * Who an image is shared with. Admins: "Shared with everyone" and any group; the image's owner:
 * the groups they are in; anyone else sees who it is shared with.
 */
export function SharePanel(props: ISharePanelProps): JSX.Element | null {
  const { api, image, user, onUpdate } = props;
  const name = nameOf(image);
  const everyone = isShared(image);
  const groups = sharedGroupsOf(image);
  const isOwner = creatorOf(image) === user.name;
  const [typed, setTyped] = React.useState('');
  const [busy, setBusy] = React.useState(false);
  const [error, setError] = React.useState<string | null>(null);
  const listId = React.useMemo(() => `cnbi-groups-${Math.random().toString(36).slice(2, 8)}`, []);

  if (!user.admin && !isOwner) {
    if (!everyone && !groups.length) {
      return null;
    }
    return (
      <p className="cnbi-share-summary" data-testid="cnbi-share-summary">
        Shared with {everyone ? 'everyone' : groups.join(', ')}
      </p>
    );
  }

  const patch = async (change: IImagePatch) => {
    setBusy(true);
    setError(null);
    try {
      onUpdate(await api.patchImage(name, change));
      return true;
    } catch (e) {
      const err = e as CnbiApiError;
      setError(withoutFieldPrefix(err.message, err.field));
      return false;
    } finally {
      setBusy(false);
    }
  };

  const wanted = parseGroupNames(typed).filter(g => !groups.includes(g));
  const allowed = user.admin || wanted.every(g => user.groups.includes(g));
  const add = async () => {
    if (!wanted.length || !allowed) {
      return;
    }
    if (await patch({ sharedWithGroups: [...groups, ...wanted].sort() })) {
      setTyped('');
    }
  };
  const suggestions = user.groups.filter(g => !groups.includes(g));
  const canPickGroups = user.admin || user.groups.length > 0;

  return (
    <div className="cnbi-share" data-testid="cnbi-share">
      <h4>Sharing</h4>
      {user.admin ? (
        <label className="cnbi-share-everyone">
          <input
            type="checkbox"
            role="switch"
            data-testid="cnbi-share-everyone"
            checked={everyone}
            disabled={busy}
            onChange={e => void patch({ shared: e.target.checked })}
          />{' '}
          Shared with everyone
        </label>
      ) : (
        everyone && (
          <p className="cnbi-hint" data-testid="cnbi-share-summary">
            An admin shared this image with everyone.
          </p>
        )
      )}
      <div className="cnbi-share-groups" aria-label="Shared with groups">
        {groups.length === 0 && <span className="cnbi-hint">Not shared with any group.</span>}
        {groups.map(group => {
          // Owners may take back only what they could give (groups they are in).
          const removable = user.admin || user.groups.includes(group);
          return (
            <span
              key={group}
              className="cnbi-chip"
              data-testid="cnbi-share-group"
              data-group={group}
            >
              {group}
              {removable && (
                <button
                  type="button"
                  className="cnbi-chip-remove"
                  data-testid="cnbi-share-group-remove"
                  aria-label={`Stop sharing with ${group}`}
                  title={`Stop sharing with ${group}`}
                  disabled={busy}
                  onClick={() =>
                    void patch({ sharedWithGroups: groups.filter(g => g !== group) })
                  }
                >
                  <closeIcon.react tag="span" elementSize="small" />
                </button>
              )}
            </span>
          );
        })}
      </div>
      {canPickGroups ? (
        <div className="cnbi-inline cnbi-share-add">
          <input
            className="jp-mod-styled"
            data-testid="cnbi-share-group-input"
            aria-label="Share with group"
            placeholder={user.admin ? 'group name' : 'one of your groups'}
            list={listId}
            value={typed}
            disabled={busy}
            onChange={e => setTyped(e.target.value)}
            onKeyDown={e => {
              if (e.key === 'Enter') {
                e.preventDefault();
                void add();
              }
            }}
          />
          <datalist id={listId}>
            {suggestions.map(g => (
              <option key={g} value={g} />
            ))}
          </datalist>
          <button
            type="button"
            className="jp-mod-styled jp-mod-reject cnbi-button"
            data-testid="cnbi-share-group-add"
            disabled={busy || !wanted.length || !allowed}
            onClick={() => void add()}
          >
            Share
          </button>
        </div>
      ) : (
        <p className="cnbi-hint">You are in no group to share this image with.</p>
      )}
      {!user.admin && canPickGroups && (
        <span className="cnbi-hint" data-testid="cnbi-share-hint">
          {ownerShareHint(user.groups, groups, wanted)}
        </span>
      )}
      {error && (
        <p className="cnbi-error" data-testid="cnbi-share-error" role="alert">
          {error}
        </p>
      )}
    </div>
  );
}
