import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import {
  BuildType,
  EMPTY_FORM,
  IBaseImage,
  ICheckImageResult,
  ICustomNBImage,
  IImageForm,
  imageFromForm,
  packageErrorLine,
  parsePackageLines
} from '../model';

export const DRY_RUN_DELAY_MS = 500;

const TABS: { type: BuildType; label: string }[] = [
  { type: 'PackageList', label: 'Packages' },
  { type: 'GitRepository', label: 'Git repository' },
  { type: 'ImageImport', label: 'Import image' }
];

interface IFieldError {
  message: string;
  field?: string;
  /** the packages textarea line at fault, when the field is spec.packageVersions[i] */
  line?: number | null;
}

/** The service's message may start with the field it names; next to "Line 2" that is noise. */
export function withoutField(message: string, field?: string): string {
  return field && message.startsWith(`${field}: `) ? message.slice(field.length + 2) : message;
}

export interface ICreateFormProps {
  api: CnbiApi;
  onCreated: (image: ICustomNBImage) => void;
  onCancel?: () => void;
  dryRunDelayMs?: number;
}

export function CreateForm(props: ICreateFormProps): JSX.Element {
  const { api, onCreated, onCancel } = props;
  const delay = props.dryRunDelayMs ?? DRY_RUN_DELAY_MS;
  const [form, setForm] = React.useState<IImageForm>(EMPTY_FORM);
  const [baseImages, setBaseImages] = React.useState<IBaseImage[]>([]);
  const [baseImagesError, setBaseImagesError] = React.useState<string | null>(null);
  const [check, setCheck] = React.useState<IFieldError | null>(null);
  const [submitError, setSubmitError] = React.useState<IFieldError | null>(null);
  const [submitting, setSubmitting] = React.useState(false);
  const [exists, setExists] = React.useState<
    ICheckImageResult | { error: string } | null
  >(null);
  const id = React.useMemo(() => `cnbi-${Math.random().toString(36).slice(2, 8)}`, []);

  React.useEffect(() => {
    let live = true;
    api.baseImages().then(
      result => {
        if (!live) {
          return;
        }
        setBaseImages(result.items);
        if (result.items.length) {
          setForm(f => (f.baseImage ? f : { ...f, baseImage: result.items[0].image }));
        }
      },
      (error: CnbiApiError) => live && setBaseImagesError(error.message)
    );
    return () => {
      live = false;
    };
  }, [api]);

  const update = (changes: Partial<IImageForm>) => {
    setForm(f => ({ ...f, ...changes }));
    if ('packagesText' in changes || 'buildType' in changes) {
      // A refused submit named a line of the old text; the new text gets its own dry run.
      setSubmitError(e => (e?.line != null ? null : e));
    }
  };

  // Validate the packages as they are typed: the service's dry run names the entry at fault.
  React.useEffect(() => {
    if (form.buildType !== 'PackageList' || !form.packagesText.trim()) {
      setCheck(null);
      return;
    }
    let live = true;
    const timer = setTimeout(() => {
      const draft = imageFromForm({ ...form, displayName: form.displayName || 'draft' });
      const lines = parsePackageLines(form.packagesText);
      api.createImage(draft, true).then(
        () => live && setCheck(null),
        (error: CnbiApiError) => {
          if (!live) {
            return;
          }
          const line = packageErrorLine(error.field, lines);
          // Only package errors matter while typing; the rest shows on submit.
          setCheck(line === null ? null : { message: error.message, field: error.field, line });
        }
      );
    }, delay);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [api, form.packagesText, form.baseImage, form.buildType, delay]);

  const submit = async (event: React.FormEvent) => {
    event.preventDefault();
    setSubmitting(true);
    setSubmitError(null);
    try {
      const created = await api.createImage(imageFromForm(form));
      setForm({ ...EMPTY_FORM, baseImage: form.baseImage });
      onCreated(created);
    } catch (e) {
      const error = e as CnbiApiError;
      setSubmitError({
        message: error.message,
        field: error.field,
        line: packageErrorLine(error.field, parsePackageLines(form.packagesText))
      });
    } finally {
      setSubmitting(false);
    }
  };

  const checkExists = async () => {
    setExists(null);
    try {
      setExists(await api.checkImage(form.fromImage.trim()));
    } catch (e) {
      setExists({ error: (e as CnbiApiError).message });
    }
  };

  const packageError = check ?? (submitError?.line != null ? submitError : null);
  const lineCount = form.packagesText.split('\n').length;

  return (
    <form className="cnbi-create-form" data-testid="cnbi-create-form" onSubmit={submit}>
      <h3>New image</h3>
      <div className="cnbi-field">
        <label htmlFor={`${id}-name`}>Name</label>
        <input
          id={`${id}-name`}
          className="jp-mod-styled"
          data-testid="cnbi-name"
          required
          value={form.displayName}
          onChange={e => update({ displayName: e.target.value })}
        />
      </div>
      <div className="cnbi-field">
        <label htmlFor={`${id}-desc`}>Description</label>
        <input
          id={`${id}-desc`}
          className="jp-mod-styled"
          data-testid="cnbi-description"
          value={form.description}
          onChange={e => update({ description: e.target.value })}
        />
      </div>
      <div className="cnbi-tabs" role="tablist" aria-label="How to build the image">
        {TABS.map(tab => (
          <button
            type="button"
            role="tab"
            key={tab.type}
            id={`${id}-tab-${tab.type}`}
            aria-selected={form.buildType === tab.type}
            aria-controls={`${id}-tabpanel`}
            className={'cnbi-tab' + (form.buildType === tab.type ? ' cnbi-tab-active' : '')}
            data-testid={`cnbi-tab-${tab.type}`}
            onClick={() => update({ buildType: tab.type })}
          >
            {tab.label}
          </button>
        ))}
      </div>
      <div
        className="cnbi-tabpanel"
        role="tabpanel"
        id={`${id}-tabpanel`}
        aria-labelledby={`${id}-tab-${form.buildType}`}
      >
        {form.buildType !== 'ImageImport' && (
          <div className="cnbi-field">
            <label htmlFor={`${id}-base`}>Base image</label>
            <select
              id={`${id}-base`}
              className="jp-mod-styled"
              data-testid="cnbi-base-image"
              value={form.baseImage}
              onChange={e => update({ baseImage: e.target.value })}
            >
              {baseImages.map(b => (
                <option key={b.image} value={b.image} title={b.description}>
                  {b.displayName || b.image}
                </option>
              ))}
            </select>
            {baseImagesError && <span className="cnbi-error">{baseImagesError}</span>}
          </div>
        )}
        {form.buildType === 'GitRepository' && (
          <>
            <div className="cnbi-field">
              <label htmlFor={`${id}-repo`}>Repository URL</label>
              <input
                id={`${id}-repo`}
                className="jp-mod-styled"
                data-testid="cnbi-repository"
                type="url"
                required
                placeholder="https://github.com/org/repo"
                value={form.repository}
                onChange={e => update({ repository: e.target.value })}
              />
            </div>
            <div className="cnbi-field">
              <label htmlFor={`${id}-ref`}>Branch, tag or commit</label>
              <input
                id={`${id}-ref`}
                className="jp-mod-styled"
                data-testid="cnbi-git-ref"
                placeholder="main"
                value={form.gitRef}
                onChange={e => update({ gitRef: e.target.value })}
              />
            </div>
          </>
        )}
        {form.buildType !== 'ImageImport' && (
          <div className="cnbi-field cnbi-packages-field">
            <label htmlFor={`${id}-packages`}>
              Packages {form.buildType === 'GitRepository' && '(in addition to the repository’s)'}
              <span className="cnbi-hint"> one per line, e.g. pandas&gt;=2</span>
            </label>
            <div className="cnbi-packages">
              <ol className="cnbi-package-gutter" aria-hidden="true">
                {Array.from({ length: lineCount }, (_, line) => (
                  <li
                    key={line}
                    className={packageError?.line === line ? 'cnbi-line-error' : undefined}
                  >
                    {line + 1}
                  </li>
                ))}
              </ol>
              <textarea
                id={`${id}-packages`}
                className="jp-mod-styled"
                data-testid="cnbi-packages"
                rows={Math.max(6, Math.min(lineCount + 1, 20))}
                spellCheck={false}
                aria-invalid={!!packageError}
                aria-describedby={packageError ? `${id}-package-error` : undefined}
                value={form.packagesText}
                onChange={e => update({ packagesText: e.target.value })}
              />
            </div>
            {packageError && packageError.line != null && (
              <div
                id={`${id}-package-error`}
                className="cnbi-package-error cnbi-error"
                data-testid="cnbi-package-error"
                data-line={packageError.line + 1}
                role="alert"
              >
                Line {packageError.line + 1}: {withoutField(packageError.message, packageError.field)}
              </div>
            )}
          </div>
        )}
        {form.buildType === 'ImageImport' && (
          <div className="cnbi-field">
            <label htmlFor={`${id}-from`}>Image reference</label>
            <div className="cnbi-inline">
              <input
                id={`${id}-from`}
                className="jp-mod-styled"
                data-testid="cnbi-from-image"
                required
                placeholder="quay.io/org/image:tag"
                value={form.fromImage}
                onChange={e => {
                  update({ fromImage: e.target.value });
                  setExists(null);
                }}
              />
              <button
                type="button"
                className="jp-mod-styled jp-mod-reject cnbi-button"
                data-testid="cnbi-check-image"
                disabled={!form.fromImage.trim()}
                onClick={checkExists}
              >
                Exists?
              </button>
            </div>
            {exists && (
              <div className="cnbi-check-result" data-testid="cnbi-check-result" role="status">
                {'error' in exists
                  ? exists.error
                  : exists.exists
                    ? `Found: ${exists.digest ?? ''}${
                        exists.platforms?.length ? ` (${exists.platforms.join(', ')})` : ''
                      }`
                    : 'Not found'}
              </div>
            )}
          </div>
        )}
      </div>
      {submitError && submitError.line == null && (
        <div className="cnbi-error" data-testid="cnbi-submit-error" role="alert">
          {submitError.field ? `${submitError.field}: ` : ''}
          {submitError.message}
        </div>
      )}
      <div className="cnbi-actions">
        {onCancel && (
          <button type="button" className="jp-mod-styled jp-mod-reject cnbi-button" onClick={onCancel}>
            Cancel
          </button>
        )}
        <button
          type="submit"
          className="jp-mod-styled jp-mod-accept cnbi-button"
          data-testid="cnbi-submit"
          disabled={submitting}
        >
          {submitting ? 'Creating…' : 'Build image'}
        </button>
      </div>
    </form>
  );
}
