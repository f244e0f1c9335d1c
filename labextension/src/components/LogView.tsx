import * as React from 'react';

import { LogBuffer } from '../logbuffer';
import { logSeparator } from '../model';

/**
 * Appends log lines to the <pre>: runs of ordinary lines as one text node each, and every
 * `=== Run N … ===` line as a separator (a rule with its label), so rebuilds stand apart.
 */
export function appendLogLines(node: HTMLElement, lines: readonly string[]): void {
  let text = '';
  const flush = () => {
    if (text) {
      node.appendChild(document.createTextNode(text));
      text = '';
    }
  };
  for (const line of lines) {
    const separator = logSeparator(line);
    if (!separator) {
      text += line + '\n';
      continue;
    }
    flush();
    const rule = document.createElement('span');
    rule.className = 'cnbi-log-separator';
    rule.dataset.testid = 'cnbi-log-separator';
    rule.dataset.run = String(separator.run);
    rule.setAttribute('role', 'separator');
    rule.setAttribute('aria-label', separator.label);
    const label = document.createElement('span');
    label.className = 'cnbi-log-separator-label';
    label.textContent = separator.label;
    rule.appendChild(label);
    // Copying the log still gives the line as the service wrote it.
    rule.dataset.line = line;
    node.appendChild(rule);
  }
  flush();
}

export interface ILogViewProps {
  buffer: LogBuffer;
  /** Bumped by the owner whenever lines were appended or replaced. */
  version: number;
  /** Where the full log can be downloaded (shown when older lines were dropped). */
  fullLogUrl?: string;
}

/**
 * The build log: appends new lines as text nodes (no re-render of what is shown), follows the
 * end unless the user scrolled up, and shows at most LogBuffer.maxLines lines.
 */
export function LogView(props: ILogViewProps): JSX.Element {
  const { buffer, version, fullLogUrl } = props;
  const pre = React.useRef<HTMLPreElement>(null);
  const rendered = React.useRef({ generation: -1, count: 0 });
  const follow = React.useRef(true);

  React.useLayoutEffect(() => {
    const node = pre.current;
    if (!node) {
      return;
    }
    const lines = buffer.lines;
    const state = rendered.current;
    if (state.generation !== buffer.generation || state.count > lines.length) {
      node.textContent = '';
      appendLogLines(node, lines);
    } else if (lines.length > state.count) {
      appendLogLines(node, lines.slice(state.count));
    }
    state.generation = buffer.generation;
    state.count = lines.length;
    if (follow.current) {
      node.scrollTop = node.scrollHeight;
    }
  }, [buffer, version]);

  const onScroll = React.useCallback(() => {
    const node = pre.current;
    if (node) {
      follow.current =
        node.scrollTop + node.clientHeight >= node.scrollHeight - 8;
    }
  }, []);

  return (
    <div className="cnbi-log-container">
      {buffer.dropped > 0 && (
        <div className="cnbi-log-trimmed" data-testid="cnbi-log-trimmed">
          {buffer.dropped} earlier lines not shown.{' '}
          {fullLogUrl && (
            <a href={fullLogUrl} target="_blank" rel="noopener noreferrer">
              Open the full log
            </a>
          )}
        </div>
      )}
      <pre
        ref={pre}
        className="cnbi-log"
        data-testid="cnbi-log"
        onScroll={onScroll}
        aria-label="Build log"
        tabIndex={0}
      />
    </div>
  );
}
