import * as React from 'react';

import { CnbiApi, CnbiApiError } from '../api';
import {
  BuildType,
  EMPTY_FORM,
  FormInput,
  IBaseImage,
  ICheckImageResult,
  ICustomNBImage,
  IImageForm,
  IPackageLineError,
  checkPackageLines,
  displayNameOf,
  formInputOf,
  imageFromForm,
  nameOf,
  packageErrorText,
  packageLineError,
  parsePackageLines,
  phaseOf,
  withoutFieldPrefix
} from '../model';
import { GitCredentialField } from './GitCredentialField';

export const DRY_RUN_DELAY_MS = 500;

const TABS: { type: BuildType; label: string }[] = [
  { type: 'PackageList', label: 'Packages' },
  { type: 'GitRepository', label: 'Git repository' },
  { type: 'ImageImport', label: 'Import image' }
];

/** A message of the service about one input, for the value that input had when it was sent. */
interface IFieldError {
  message: string;
  /** The input's value the message describes: it shows only while the input still holds it. */
  value: string;
  /** For the packages textarea: the line (and related line) at fault. */
  lines?: IPackageLineError | null;
}

type FieldErrors = Partial<Record<FormInput, IFieldError>>;

/** The inputs the tab of a build type shows (a message for another input shows at the end). */
export function inputsOf(buildType: BuildType): FormInput[] {
  const common: FormInput[] = ['displayName', 'description'];
  switch (buildType) {
    case 'ImageImport':
      return [...common, 'fromImage'];
    case 'GitRepository':
      return [
        ...common,
        'baseImage',
        'repository',
        'gitRef',
        'gitCredential',
        'packagesText',
        'rebuildSchedule'
      ];
    default:
      return [...common, 'baseImage', 'packagesText', 'rebuildSchedule'];
  }
}

/**
 * The message of a refused request without a field path in front (kept for an older service
 * that put one there): `spec.repository: spec.repository: x` → `x`.
 */
export function withoutField(message: string, field?: string): string {
  return withoutFieldPrefix(message, field);
}

/** The import tab's "Exists?" answer, for the reference it was asked about. */
interface IImageCheck {
  ref: string;
  pending?: boolean;
  result?: ICheckImageResult;
  error?: string;
}

function checkText(check: IImageCheck): string {
  if (check.pending) {
    return 'Checking…';
  }
  if (check.error !== undefined) {
    return check.error;
  }
  const r = check.result!;
  switch (r.result) {
    case 'found':
      return `Found: ${r.digest ?? ''}${r.platforms?.length ? ` (${r.platforms.join(', ')})` : ''}`;
    case 'private':
      return `Private: ${
        r.message || 'the registry wants credentials'
      }. Importing it needs an image pull secret.`;
    default:
      return r.message ? `Not found: ${r.message}` : 'Not found';
  }
}

export interface ICreateFormProps {
  api: CnbiApi;
  /** Images the user may build on (`cnbi:<name>`): the Ready ones of the list. */
  stackable?: ICustomNBImage[];
  onCreated: (image: ICustomNBImage) => void;
  onCancel?: () => void;
  dryRunDelayMs?: number;
  /** The form's first content ("Edit as new", "Save this environment"); empty by default. */
  initial?: IImageForm;
  /** A line above the form saying where its content comes from. */
  notice?: string;
}

export function CreateForm(props: ICreateFormProps): JSX.Element {
  const { api, onCreated, onCancel, notice } = props;
  const delay = props.dryRunDelayMs ?? DRY_RUN_DELAY_MS;
  const [form, setForm] = React.useState<IImageForm>(() => props.initial ?? EMPTY_FORM);
  const [baseImages, setBaseImages] = React.useState<IBaseImage[]>([]);
  const [baseImagesError, setBaseImagesError] = React.useState<string | null>(null);
  // The dry run's answer about a package line, for the text it was asked about.
  const [dryRun, setDryRun] = React.useState<{ text: string; error: IPackageLineError } | null>(
    null
  );
  const [fieldErrors, setFieldErrors] = React.useState<FieldErrors>({});
  const [generalError, setGeneralError] = React.useState<string | null>(null);
  const [submitting, setSubmitting] = React.useState(false);
  const [imageCheck, setImageCheck] = React.useState<IImageCheck | null>(null);
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
    if ('buildType' in changes) {
      // Another tab: the messages were about the other tab's inputs.
      setFieldErrors({});
      setGeneralError(null);
      return;
    }
    // A message belongs to the value it was about: editing the input clears it.
    setFieldErrors(errors => {
      const next = { ...errors };
      for (const key of Object.keys(changes)) {
        delete next[key as FormInput];
      }
      return next;
    });
  };

  // What can be told at once, in the service's words (duplicates, a dangling ==).
  const localError = React.useMemo(
    () => (form.buildType === 'ImageImport' ? null : checkPackageLines(form.packagesText)),
    [form.packagesText, form.buildType]
  );

  // Validate the packages as they are typed: the service's dry run names the entry at fault.
  React.useEffect(() => {
    if (form.buildType !== 'PackageList' || !form.packagesText.trim() || localError) {
      setDryRun(null);
      return;
    }
    let live = true;
    const text = form.packagesText;
    const timer = setTimeout(() => {
      const draft = imageFromForm({ ...form, displayName: form.displayName || 'draft' });
      const lines = parsePackageLines(text);
      api.createImage(draft, true).then(
        () => live && setDryRun(null),
        (error: CnbiApiError) => {
          if (!live) {
            return;
          }
          // Only package errors matter while typing; the rest shows on submit.
          const lineError = packageLineError(error, lines);
          setDryRun(lineError ? { text, error: lineError } : null);
        }
      );
    }, delay);
    return () => {
      live = false;
      clearTimeout(timer);
    };
  }, [api, form.packagesText, form.baseImage, form.buildType, delay, localError]);

  const submit = async (event: React.FormEvent) => {
    event.preventDefault();
    setSubmitting(true);
    setFieldErrors({});
    setGeneralError(null);
    const sent = form;
    try {
      const created = await api.createImage(imageFromForm(sent));
      setForm({ ...EMPTY_FORM, baseImage: sent.baseImage });
      onCreated(created);
    } catch (e) {
      const error = e as CnbiApiError;
      const input = formInputOf(error.field);
      const message = withoutFieldPrefix(error.message, error.field);
      if (input && inputsOf(sent.buildType).includes(input)) {
        setFieldErrors({
          [input]: {
            message,
            value: sent[input],
            lines:
              input === 'packagesText'
                ? packageLineError(error, parsePackageLines(sent.packagesText))
                : null
          }
        });
      } else {
        setGeneralError(message);
      }
    } finally {
      setSubmitting(false);
    }
  };

  const checkExists = async () => {
    const ref = form.fromImage.trim();
    setImageCheck({ ref, pending: true });
    try {
      const result = await api.checkImage(ref);
      setImageCheck(c => (c?.ref === ref ? { ref, result } : c));
    } catch (e) {
      const error = e as CnbiApiError;
      setImageCheck(c => (c?.ref === ref ? { ref, error: withoutFieldPrefix(error.message) } : c));
    }
  };

  /** The message of the service for `input`, while the input still holds what was sent. */
  const errorOf = (input: FormInput): IFieldError | null => {
    const error = fieldErrors[input];
    return error && error.value === form[input] ? error : null;
  };

  const fieldError = (input: FormInput) => {
    const error = errorOf(input);
    return (
      error &&
      !error.lines && (
        <span
          className="cnbi-error cnbi-field-error"
          data-testid="cnbi-field-error"
          data-field={input}
          role="alert"
        >
          {error.message}
        </span>
      )
    );
  };

  const submitted = errorOf('packagesText');
  const packageError: IPackageLineError | null =
    submitted?.lines ??
    localError ??
    (dryRun && dryRun.text === form.packagesText ? dryRun.error : null);
  const lineCount = form.packagesText.split('\n').length;
  const shownCheck = imageCheck && imageCheck.ref === form.fromImage.trim() ? imageCheck : null;
  const notFound =
    form.buildType === 'ImageImport' && shownCheck?.result?.result === 'notFound';
  const stackOptions = (props.stackable ?? [])
    .filter(image => phaseOf(image) === 'Ready')
    .map(image => ({ image: `cnbi:${nameOf(image)}`, displayName: displayNameOf(image) }));
  const baseOptions =
    form.baseImage &&
    !baseImages.some(b => b.image === form.baseImage) &&
    !stackOptions.some(b => b.image === form.baseImage)
      ? [...baseImages, { image: form.baseImage, displayName: form.baseImage }]
      : baseImages;
  const runtimeEnvironment = Object.entries(form.runtimeEnvironment ?? {});

  return (
    <form className="cnbi-create-form" data-testid="cnbi-create-form" onSubmit={submit}>
      <h3>New image</h3>
      {notice && (
        <p className="cnbi-form-notice" data-testid="cnbi-form-notice">
          {notice}
        </p>
      )}
      <div className="cnbi-field">
        <label htmlFor={`${id}-name`}>Name</label>
        <input
          id={`${id}-name`}
          className="jp-mod-styled"
          data-testid="cnbi-name"
          required
          value={form.displayName}
          aria-invalid={!!errorOf('displayName')}
          onChange={e => update({ displayName: e.target.value })}
        />
        {fieldError('displayName')}
      </div>
      <div className="cnbi-field">
        <label htmlFor={`${id}-desc`}>Description</label>
        <input
          id={`${id}-desc`}
          className="jp-mod-styled"
          data-testid="cnbi-description"
          value={form.description}
          aria-invalid={!!errorOf('description')}
          onChange={e => update({ description: e.target.value })}
        />
        {fieldError('description')}
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
        {form.buildType === 'GitRepository' && (
          <div className="cnbi-help" data-testid="cnbi-git-help">
            <p>What the repository may contain, and what is used when several are there:</p>
            <ul>
              <li>
                A <code>Containerfile</code> or <code>Dockerfile</code> is built as it is; it
                wins over everything else (the base image and packages below are not used).
              </li>
              <li>
                Otherwise <code>environment.yml</code> (its <code>pip</code> section), else{' '}
                <code>requirements.txt</code>, is installed on the base image.
              </li>
              <li>
                Without a Containerfile, <code>apt.txt</code> adds Debian packages and{' '}
                <code>postBuild</code> runs after the installation (also with neither file above).
              </li>
            </ul>
          </div>
        )}
        {form.buildType !== 'ImageImport' && (
          <div className="cnbi-field">
            <label htmlFor={`${id}-base`}>Base image</label>
            <select
              id={`${id}-base`}
              className="jp-mod-styled"
              data-testid="cnbi-base-image"
              value={form.baseImage}
              aria-invalid={!!errorOf('baseImage')}
              onChange={e => update({ baseImage: e.target.value })}
            >
              {baseOptions.map(b => (
                <option key={b.image} value={b.image} title={b.description}>
                  {b.displayName || b.image}
                </option>
              ))}
              {stackOptions.length > 0 && (
                // yours and those shared with you; an image built on one is rebuilt after each new build of it
                <optgroup label="Ready images you may use" data-testid="cnbi-stack-bases">
                  {stackOptions.map(b => (
                    <option key={b.image} value={b.image} title={b.image}>
                      {b.displayName}
                    </option>
                  ))}
                </optgroup>
              )}
            </select>
            {baseImagesError && <span className="cnbi-error">{baseImagesError}</span>}
            {fieldError('baseImage')}
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
                aria-invalid={!!errorOf('repository')}
                onChange={e => update({ repository: e.target.value })}
              />
              {fieldError('repository')}
            </div>
            <div className="cnbi-field">
              <label htmlFor={`${id}-ref`}>Branch, tag or commit</label>
              <input
                id={`${id}-ref`}
                className="jp-mod-styled"
                data-testid="cnbi-git-ref"
                placeholder="main"
                value={form.gitRef}
                aria-invalid={!!errorOf('gitRef')}
                onChange={e => update({ gitRef: e.target.value })}
              />
              {fieldError('gitRef')}
            </div>
            <GitCredentialField
              api={api}
              id={id}
              repository={form.repository}
              value={form.gitCredential}
              invalid={!!errorOf('gitCredential')}
              error={fieldError('gitCredential')}
              onChange={gitCredential => update({ gitCredential })}
            />
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
                    className={
                      packageError?.line === line
                        ? 'cnbi-line-error'
                        : packageError?.relatedLine === line
                          ? 'cnbi-line-related'
                          : undefined
                    }
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
                aria-invalid={!!packageError || !!submitted}
                aria-describedby={packageError ? `${id}-package-error` : undefined}
                value={form.packagesText}
                onChange={e => update({ packagesText: e.target.value })}
              />
            </div>
            {packageError && (
              <div
                id={`${id}-package-error`}
                className="cnbi-package-error cnbi-error"
                data-testid="cnbi-package-error"
                data-line={packageError.line + 1}
                data-related-line={
                  packageError.relatedLine != null ? packageError.relatedLine + 1 : undefined
                }
                role="alert"
              >
                {packageErrorText(packageError)}
              </div>
            )}
            {fieldError('packagesText')}
            {runtimeEnvironment.length > 0 && (
              <span className="cnbi-hint" data-testid="cnbi-runtime-env">
                Runtime environment kept from the original:{' '}
                {runtimeEnvironment.map(([k, v]) => `${k}=${v}`).join(', ')}
              </span>
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
                aria-invalid={!!errorOf('fromImage') || notFound}
                onChange={e => update({ fromImage: e.target.value })}
              />
              <button
                type="button"
                className="jp-mod-styled jp-mod-reject cnbi-button"
                data-testid="cnbi-check-image"
                disabled={!form.fromImage.trim() || !!shownCheck?.pending}
                onClick={checkExists}
              >
                Exists?
              </button>
            </div>
            {shownCheck && (
              <div
                className={
                  'cnbi-check-result' +
                  (shownCheck.result
                    ? ` cnbi-check-${shownCheck.result.result}`
                    : shownCheck.error !== undefined
                      ? ' cnbi-check-error'
                      : '')
                }
                data-testid="cnbi-check-result"
                data-result={shownCheck.result?.result ?? (shownCheck.error !== undefined ? 'error' : 'pending')}
                role="status"
              >
                {checkText(shownCheck)}
              </div>
            )}
            {fieldError('fromImage')}
          </div>
        )}
      </div>
      {form.buildType !== 'ImageImport' && (
        <div className="cnbi-field">
          <label htmlFor={`${id}-schedule`}>Rebuild on a schedule</label>
          <select
            id={`${id}-schedule`}
            className="jp-mod-styled"
            data-testid="cnbi-rebuild-schedule"
            value={form.rebuildSchedule}
            aria-invalid={!!errorOf('rebuildSchedule')}
            onChange={e => update({ rebuildSchedule: e.target.value as IImageForm['rebuildSchedule'] })}
          >
            <option value="">Never (only when asked, or when its base image changes)</option>
            <option value="daily">Daily</option>
            <option value="weekly">Weekly</option>
            <option value="monthly">Monthly</option>
          </select>
          <span className="cnbi-hint">
            A rebuild picks up newer versions that the packages you list allow (pin a version with ==
            to keep it).
          </span>
          {fieldError('rebuildSchedule')}
        </div>
      )}
      {generalError && (
        <div className="cnbi-error cnbi-submit-error" data-testid="cnbi-submit-error" role="alert">
          {generalError}
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
          disabled={submitting || notFound}
          title={notFound ? 'The registry does not have this image' : undefined}
        >
          {submitting ? 'Creating…' : 'Build image'}
        </button>
      </div>
    </form>
  );
}
