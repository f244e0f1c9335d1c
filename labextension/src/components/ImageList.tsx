import * as React from 'react';

import {
  ICustomNBImage,
  IProgress,
  ISharedImage,
  IUserInfo,
  PROGRESS_STEPS,
  creatorOf,
  displayNameOf,
  durationLabel,
  failureMessage,
  imageSections,
  isShared,
  isTerminal,
  nameOf,
  phaseProgress,
  sharedGroupsOf,
  sharedWithLabel
} from '../model';

/** The phase, from the same IProgress the bar is drawn from. */
export function PhaseBadge(props: { progress: IProgress }): JSX.Element {
  const phase = props.progress.phase;
  return (
    <span
      className={`cnbi-phase-badge cnbi-phase-${phase.toLowerCase()}`}
      data-testid="cnbi-phase-badge"
      data-phase={phase}
      title={props.progress.label}
    >
      {phase}
    </span>
  );
}

/** Prepare → Resolving → Building → Ready, the current step highlighted. */
export function BuildProgress(props: { progress: IProgress }): JSX.Element {
  const progress = props.progress;
  const percent = Math.round(progress.fraction * 100);
  return (
    <div
      className={
        'cnbi-progress' +
        (progress.failed ? ' cnbi-progress-failed' : '') +
        (progress.done && !progress.failed ? ' cnbi-progress-done' : '')
      }
      data-testid="cnbi-progress"
      data-phase={progress.phase}
    >
      <div
        className="cnbi-progress-bar"
        role="progressbar"
        aria-label={progress.label}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={percent}
      >
        <div className="cnbi-progress-fill" style={{ width: `${percent}%` }} />
      </div>
      <ol className="cnbi-progress-steps">
        {PROGRESS_STEPS.map((step, index) => (
          <li
            key={step}
            className={
              index < progress.step || (progress.done && !progress.failed)
                ? 'cnbi-step-done'
                : index === progress.step
                  ? progress.failed
                    ? 'cnbi-step-failed'
                    : 'cnbi-step-current'
                  : 'cnbi-step-todo'
            }
          >
            {step}
          </li>
        ))}
      </ol>
    </div>
  );
}

/** "shared with everyone", "shared with team-a, team-b", or '' (for my own images' rows). */
function sharingText(image: ICustomNBImage): string {
  if (isShared(image)) {
    return 'shared with everyone';
  }
  const groups = sharedGroupsOf(image);
  return groups.length ? `shared with ${groups.join(', ')}` : '';
}

export interface IImageRowProps {
  image: ICustomNBImage;
  selected: boolean;
  currentUser: string;
  now: number;
  onSelect: (name: string) => void;
  /** In "Shared with me": who it is shared with (shown instead of the sharing note). */
  sharedWith?: ISharedImage['sharedWith'];
}

export function ImageRow(props: IImageRowProps): JSX.Element {
  const { image, selected, currentUser, now, onSelect, sharedWith } = props;
  const name = nameOf(image);
  const creator = creatorOf(image);
  const failure = failureMessage(image);
  const duration = durationLabel(image, now);
  const progress = phaseProgress(image);
  const sharing = sharedWith === undefined ? sharingText(image) : '';
  return (
    <li
      className={'cnbi-image-row' + (selected ? ' cnbi-selected' : '')}
      data-testid="cnbi-image-row"
      data-name={name}
      data-phase={progress.phase}
    >
      <button
        className="cnbi-image-row-button"
        aria-pressed={selected}
        onClick={() => onSelect(name)}
      >
        <span className="cnbi-image-row-head">
          <span className="cnbi-image-name">{displayNameOf(image)}</span>
          <PhaseBadge progress={progress} />
        </span>
        <span className="cnbi-image-meta">
          {/* each part stays on one line: "by ui-" / "alice" or "failed" / "after 2 s" read badly */}
          <code>{name}</code> · {image.spec.buildType}
          {creator && creator !== currentUser && (
            <>
              {' · '}
              <span className="cnbi-nowrap">by {creator}</span>
            </>
          )}
          {sharedWith !== undefined && (
            <span className="cnbi-shared-with" data-testid="cnbi-shared-with">
              {' '}
              · <span className="cnbi-nowrap">shared with {sharedWithLabel(sharedWith)}</span>
            </span>
          )}
          {sharing && (
            <>
              {' · '}
              <span className="cnbi-nowrap">{sharing}</span>
            </>
          )}
          {duration && (
            <>
              {' · '}
              <span className="cnbi-duration cnbi-nowrap" data-testid="cnbi-duration">
                {duration}
              </span>
            </>
          )}
        </span>
        <BuildProgress progress={progress} />
        {failure && (
          <span className="cnbi-failure cnbi-row-failure" data-testid="cnbi-failure">
            {failure}
          </span>
        )}
      </button>
    </li>
  );
}

export interface IImageListProps {
  images: ICustomNBImage[];
  selected: string | null;
  /** Whose "My images" these are, and whether the admin section shows. */
  user: IUserInfo;
  onSelect: (name: string) => void;
}

export function ImageList(props: IImageListProps): JSX.Element {
  const { images, selected, user, onSelect } = props;
  const running = images.some(i => !isTerminal(phaseProgress(i).phase));
  const [now, setNow] = React.useState(Date.now());
  React.useEffect(() => {
    // Only the duration text ticks; the phases come from the event streams.
    if (!running) {
      return;
    }
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, [running]);
  const sections = React.useMemo(() => imageSections(images, user), [images, user]);
  const row = (image: ICustomNBImage, sharedWith?: ISharedImage['sharedWith']) => (
    <ImageRow
      key={nameOf(image)}
      image={image}
      selected={nameOf(image) === selected}
      currentUser={user.name}
      now={now}
      onSelect={onSelect}
      sharedWith={sharedWith}
    />
  );
  return (
    <div className="cnbi-image-list" data-testid="cnbi-image-list">
      <section className="cnbi-section" data-testid="cnbi-section-mine">
        <h3>My images</h3>
        {sections.mine.length ? (
          <ul>{sections.mine.map(image => row(image))}</ul>
        ) : (
          <p className="cnbi-empty">No images yet: create one.</p>
        )}
      </section>
      {sections.shared.length > 0 && (
        <section className="cnbi-section" data-testid="cnbi-section-shared">
          <h3>Shared with me</h3>
          <ul>{sections.shared.map(s => row(s.image, s.sharedWith))}</ul>
        </section>
      )}
      {user.admin && (
        <section className="cnbi-section" data-testid="cnbi-section-all">
          <h3>All users’ images</h3>
          {sections.others.length ? (
            sections.others.map(group => (
              <div
                key={group.owner}
                className="cnbi-owner-group"
                data-testid="cnbi-owner-group"
                data-owner={group.owner}
              >
                <h4 className="cnbi-owner">{group.owner}</h4>
                <ul>{group.images.map(image => row(image))}</ul>
              </div>
            ))
          ) : (
            <p className="cnbi-empty">No other user has an image.</p>
          )}
        </section>
      )}
    </div>
  );
}
