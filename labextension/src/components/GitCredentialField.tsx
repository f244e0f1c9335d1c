import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import { IGitCredential, credentialNameFor, repositoryHost, withoutFieldPrefix } from '../model';

export interface IGitCredentialFieldProps {
  api: CnbiApi;
  /** The form's repository URL: its host is what a token is for. */
  repository: string;
  /** The chosen credential's name; '' for a public repository. */
  value: string;
  onChange: (name: string) => void;
  /** The service's message about spec.gitCredential, if any (shown under the select). */
  error?: React.ReactNode;
  invalid?: boolean;
  id: string;
}

/** The select's "Add a token…" entry (no credential name can be it: names are DNS labels). */
const ADD_TOKEN = '+add';

/** What the "add a token" inputs hold before they are saved. */
interface INewToken {
  name: string;
  host: string;
  token: string;
  username: string;
}

/**
 * "Access": public, or one of the user's stored tokens, or a new one typed in place. A token is
 * sent to the service once, when saved; the panel never gets it back (the service only lists
 * names and hosts), so the input is cleared as soon as it is stored.
 */
export function GitCredentialField(props: IGitCredentialFieldProps): JSX.Element {
  const { api, repository, value, onChange, id } = props;
  const [credentials, setCredentials] = React.useState<IGitCredential[] | null>(null);
  const [loadError, setLoadError] = React.useState<string | null>(null);
  const [adding, setAdding] = React.useState<INewToken | null>(null);
  const [addError, setAddError] = React.useState<{ field?: string; message: string } | null>(
    null
  );
  const [saving, setSaving] = React.useState(false);
  const host = repositoryHost(repository);

  const reload = React.useCallback(async () => {
    try {
      const result = await api.listCredentials();
      setCredentials(result.items);
      setLoadError(null);
      return result.items;
    } catch (e) {
      setLoadError((e as CnbiApiError).message);
      return null;
    }
  }, [api]);

  React.useEffect(() => {
    void reload();
  }, [reload]);

  const startAdding = () => {
    setAddError(null);
    setAdding({ name: credentialNameFor(host || 'git'), host, token: '', username: '' });
  };

  const save = async () => {
    if (!adding) {
      return;
    }
    setSaving(true);
    setAddError(null);
    try {
      const body: { host: string; token: string; username?: string } = {
        host: adding.host,
        token: adding.token
      };
      if (adding.username.trim()) {
        body.username = adding.username.trim();
      }
      const stored = await api.putCredential(adding.name.trim(), body);
      setAdding(null); // the token leaves the page's state once it is stored
      await reload();
      onChange(stored.name);
    } catch (e) {
      const error = e as CnbiApiError;
      setAddError({ field: error.field, message: withoutFieldPrefix(error.message, error.field) });
    } finally {
      setSaving(false);
    }
  };

  const forget = async () => {
    if (!value) {
      return;
    }
    try {
      await api.deleteCredential(value);
    } catch (e) {
      setLoadError((e as CnbiApiError).message);
    }
    onChange('');
    await reload();
  };

  const chosen = credentials?.find(c => c.name === value);
  const wrongHost = chosen && host && chosen.host !== host;
  const addErrorFor = (field: string) =>
    addError && (addError.field ?? '') === field ? (
      <span className="cnbi-error cnbi-field-error" role="alert" data-field={field}>
        {addError.message}
      </span>
    ) : null;

  /** One input of the "add a token" box; `key` is also the field the service names in a 422. */
  const tokenInput = (
    key: keyof INewToken,
    label: string,
    options: { type?: string; placeholder?: string; hint?: string } = {}
  ) =>
    adding && (
      <div className="cnbi-field">
        <label htmlFor={`${id}-token-${key}`}>
          {label}
          {options.hint && <span className="cnbi-hint"> {options.hint}</span>}
        </label>
        <input
          id={`${id}-token-${key}`}
          className="jp-mod-styled"
          data-testid={key === 'token' ? 'cnbi-token' : `cnbi-token-${key}`}
          type={options.type ?? 'text'}
          autoComplete="off"
          placeholder={options.placeholder}
          value={adding[key]}
          aria-invalid={addError?.field === key}
          onChange={e => setAdding({ ...adding, [key]: e.target.value })}
        />
        {addErrorFor(key)}
      </div>
    );

  return (
    <div className="cnbi-field cnbi-git-credential" data-testid="cnbi-git-credential">
      <label htmlFor={`${id}-credential`}>
        Access
        <span className="cnbi-hint"> a private repository needs a token for its host</span>
      </label>
      <div className="cnbi-credential-row">
        <select
          id={`${id}-credential`}
          className="jp-mod-styled"
          data-testid="cnbi-git-credential-select"
          value={adding ? ADD_TOKEN : value}
          aria-invalid={!!props.invalid || !!wrongHost}
          onChange={e => {
            if (e.target.value === ADD_TOKEN) {
              startAdding();
            } else {
              setAdding(null);
              onChange(e.target.value);
            }
          }}
        >
          <option value="">Public repository (no token)</option>
          {(credentials ?? []).map(c => (
            <option key={c.name} value={c.name}>
              {`Token ${c.name} for ${c.host}`}
            </option>
          ))}
          {value && !chosen && credentials && <option value={value}>{value} (not stored)</option>}
          <option value={ADD_TOKEN}>{host ? `Add a token for ${host}…` : 'Add a token…'}</option>
        </select>
        {value && chosen && (
          <button
            type="button"
            className="jp-Button jp-mod-styled jp-mod-reject cnbi-small-button"
            data-testid="cnbi-git-credential-forget"
            title={`Delete the stored token ${value}; images that use it cannot be rebuilt until it is stored again`}
            onClick={() => void forget()}
          >
            Forget token
          </button>
        )}
      </div>
      {wrongHost && (
        <span className="cnbi-error cnbi-field-error" role="alert" data-testid="cnbi-credential-host">
          {`This token is for ${chosen!.host}; the repository is on ${host}.`}
        </span>
      )}
      {loadError && <span className="cnbi-error">{loadError}</span>}
      {props.error}
      {adding && (
        <div className="cnbi-add-token" data-testid="cnbi-add-token">
          <p className="cnbi-hint">
            Stored encrypted, sent only to {adding.host || 'its host'} by builds of your own images,
            and never shown again, to you or to anyone.
          </p>
          {tokenInput('host', 'Host', { placeholder: 'github.com' })}
          {tokenInput('token', 'Token', {
            type: 'password',
            placeholder: 'a personal access token that may read the repository'
          })}
          {tokenInput('name', 'Save as')}
          {tokenInput('username', 'User name', {
            hint: 'optional; GitLab and GitHub take any',
            placeholder: 'oauth2'
          })}
          {addErrorFor('')}
          <div className="cnbi-actions">
            <button
              type="button"
              className="jp-Button jp-mod-styled jp-mod-accept"
              data-testid="cnbi-token-save"
              disabled={saving || !adding.token || !adding.host.trim() || !adding.name.trim()}
              onClick={() => void save()}
            >
              {saving ? 'Saving…' : 'Save token'}
            </button>
            <button
              type="button"
              className="jp-Button jp-mod-styled jp-mod-reject"
              onClick={() => {
                setAdding(null);
                setAddError(null);
              }}
            >
              Cancel
            </button>
          </div>
        </div>
      )}
    </div>
  );
}
