import * as React from 'react';

import {
  ICustomNBImage,
  PROGRESS_STEPS,
  buildDurationSeconds,
  creatorOf,
  displayNameOf,
  failureMessage,
  formatDuration,
  isShared,
  nameOf,
  phaseOf,
  phaseProgress
} from '../model';

export function PhaseBadge(props: { image: ICustomNBImage }): JSX.Element {
  const phase = phaseOf(props.image);
  return (
    <span
      className={`cnbi-phase-badge cnbi-phase-${phase.toLowerCase()}`}
      data-testid="cnbi-phase-badge"
      data-phase={phase}
    >
      {phase}
    </span>
  );
}

/** Prepare → Resolving → Building → Ready, the current step highlighted. */
export function BuildProgress(props: { image: ICustomNBImage }): JSX.Element {
  const progress = phaseProgress(props.image);
  const percent = Math.round(progress.fraction * 100);
  return (
    <div
      className={
        'cnbi-progress' +
        (progress.failed ? ' cnbi-progress-failed' : '') +
        (progress.done && !progress.failed ? ' cnbi-progress-done' : '')
      }
      data-testid="cnbi-progress"
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

export interface IImageRowProps {
  image: ICustomNBImage;
  selected: boolean;
  currentUser: string;
  now: number;
  onSelect: (name: string) => void;
}

export function ImageRow(props: IImageRowProps): JSX.Element {
  const { image, selected, currentUser, now, onSelect } = props;
  const name = nameOf(image);
  const creator = creatorOf(image);
  const failure = failureMessage(image);
  const duration = formatDuration(buildDurationSeconds(image, now));
  return (
    <li
      className={'cnbi-image-row' + (selected ? ' cnbi-selected' : '')}
      data-testid="cnbi-image-row"
      data-name={name}
      data-phase={phaseOf(image)}
    >
      <button
        className="cnbi-image-row-button"
        aria-pressed={selected}
        onClick={() => onSelect(name)}
      >
        <span className="cnbi-image-row-head">
          <span className="cnbi-image-name">{displayNameOf(image)}</span>
          <PhaseBadge image={image} />
        </span>
        <span className="cnbi-image-meta">
          <code>{name}</code> · {image.spec.buildType}
          {creator && creator !== currentUser && ` · by ${creator}`}
          {isShared(image) && ' · shared'}
          {duration && (
            <span className="cnbi-duration" data-testid="cnbi-duration">
              {' '}
              · {duration}
            </span>
          )}
        </span>
        <BuildProgress image={image} />
        {failure && (
          <span className="cnbi-failure" data-testid="cnbi-failure">
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
  currentUser: string;
  onSelect: (name: string) => void;
}

export function ImageList(props: IImageListProps): JSX.Element {
  const { images, selected, currentUser, onSelect } = props;
  const running = images.some(i => !['Ready', 'Failed'].includes(phaseOf(i)));
  const [now, setNow] = React.useState(Date.now());
  React.useEffect(() => {
    // Only the duration text ticks; the phases come from the event streams.
    if (!running) {
      return;
    }
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, [running]);
  const mine = images.filter(i => !creatorOf(i) || creatorOf(i) === currentUser);
  const shared = images.filter(i => creatorOf(i) && creatorOf(i) !== currentUser);
  const rows = (list: ICustomNBImage[]) =>
    list.map(image => (
      <ImageRow
        key={nameOf(image)}
        image={image}
        selected={nameOf(image) === selected}
        currentUser={currentUser}
        now={now}
        onSelect={onSelect}
      />
    ));
  return (
    <div className="cnbi-image-list" data-testid="cnbi-image-list">
      <h3>My images</h3>
      {mine.length ? (
        <ul>{rows(mine)}</ul>
      ) : (
        <p className="cnbi-empty">No images yet: create one.</p>
      )}
      {shared.length > 0 && (
        <>
          <h3>Shared with everyone</h3>
          <ul>{rows(shared)}</ul>
        </>
      )}
    </div>
  );
}
