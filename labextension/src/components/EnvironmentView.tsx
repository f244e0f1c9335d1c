import * as React from 'react';

import { IEnvironment } from '../model';

export interface IEnvironmentViewProps {
  /** The environment read from the server; undefined while it loads. */
  environment?: IEnvironment;
  /** Why there is nothing to save (409, nothing installed, an error). */
  message?: string;
  onConfirm: (environment: IEnvironment) => void;
  onCancel: () => void;
}

/**
 * "Save this environment as an image": what was installed into this server (added, changed,
 * removed), for the user to confirm before the create form opens with it.
 */
export function EnvironmentView(props: IEnvironmentViewProps): JSX.Element {
  const { environment: env, message, onConfirm, onCancel } = props;
  const actions = (
    <div className="cnbi-actions">
      <button
        type="button"
        className="jp-mod-styled jp-mod-reject cnbi-button"
        data-testid="cnbi-env-cancel"
        onClick={onCancel}
      >
        {env ? 'Cancel' : 'Close'}
      </button>
      {env && (
        <button
          type="button"
          className="jp-mod-styled jp-mod-accept cnbi-button"
          data-testid="cnbi-env-confirm"
          onClick={() => onConfirm(env)}
        >
          Continue to the image form
        </button>
      )}
    </div>
  );
  return (
    <section className="cnbi-env" data-testid="cnbi-env">
      <h3>Save this environment as an image</h3>
      {!env && !message && (
        <p className="cnbi-hint" data-testid="cnbi-env-loading" role="status">
          Reading what was installed in this server…
        </p>
      )}
      {message && (
        <p className="cnbi-env-message" data-testid="cnbi-env-message" role="alert">
          {message}
        </p>
      )}
      {env && (
        <div className="cnbi-env-diff" data-testid="cnbi-env-diff">
          <p>
            Compared with{' '}
            {env.baseline === 'manifest'
              ? 'the packages of the image this server runs on'
              : 'the packages installed when this server started'}
            , this server has {env.added.length} added, {env.changed.length} changed and{' '}
            {env.removed.length} removed {env.removed.length === 1 ? 'package' : 'packages'}. The new
            image installs {env.requirements.length}{' '}
            {env.requirements.length === 1 ? 'package' : 'packages'} on{' '}
            <code>{env.baseImage}</code>; you can edit the list before building.
          </p>
          {actions}
          {env.added.length > 0 && (
            <>
              <h4>Added ({env.added.length})</h4>
              <ul className="cnbi-env-list" data-testid="cnbi-env-added">
                {env.added.map(p => (
                  <li key={p.name} className="cnbi-env-added">
                    <span className="cnbi-env-mark" aria-hidden="true">+</span> {p.name}{' '}
                    <code>{p.version}</code>
                  </li>
                ))}
              </ul>
            </>
          )}
          {env.changed.length > 0 && (
            <>
              <h4>Changed ({env.changed.length})</h4>
              <ul className="cnbi-env-list" data-testid="cnbi-env-changed">
                {env.changed.map(p => (
                  <li key={p.name} className="cnbi-env-changed">
                    <span className="cnbi-env-mark" aria-hidden="true">~</span> {p.name}{' '}
                    <code>{p.from}</code> → <code>{p.to}</code>
                  </li>
                ))}
              </ul>
            </>
          )}
          {env.removed.length > 0 && (
            <>
              <h4>Removed ({env.removed.length})</h4>
              <ul className="cnbi-env-list" data-testid="cnbi-env-removed">
                {env.removed.map(p => (
                  <li key={p.name} className="cnbi-env-removed">
                    <span className="cnbi-env-mark" aria-hidden="true">−</span> {p.name}{' '}
                    <code>{p.version}</code>
                  </li>
                ))}
              </ul>
              <p className="cnbi-hint">
                Removed packages stay in the new image: it is built on this server’s image,
                which has them.
              </p>
            </>
          )}
        </div>
      )}
      {!env && actions}
    </section>
  );
}
