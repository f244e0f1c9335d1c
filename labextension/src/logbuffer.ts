/**
 * Build log lines kept for display: appends are O(1) amortised, and only the newest
 * `maxLines` are kept for rendering (the full log stays downloadable from the service).
 */
export class LogBuffer {
  constructor(readonly maxLines = 5000) {}

  /** Lines currently kept, oldest first. */
  get lines(): readonly string[] {
    return this._lines;
  }

  /** How many older lines were dropped to respect maxLines. */
  get dropped(): number {
    return this._dropped;
  }

  /** Bumped whenever lines were dropped or replaced, so a view must redraw from scratch. */
  get generation(): number {
    return this._generation;
  }

  append(lines: readonly string[]): void {
    for (const line of lines) {
      this._lines.push(line);
    }
    // Trim in batches (at 1.25× the cap) so a steady stream does not shift the array per line.
    if (this._lines.length > this.maxLines * 1.25) {
      const excess = this._lines.length - this.maxLines;
      this._lines.splice(0, excess);
      this._dropped += excess;
      this._generation++;
    }
  }

  replace(lines: readonly string[]): void {
    this._lines = [];
    this._dropped = 0;
    this._generation++;
    this.append(lines);
  }

  private _lines: string[] = [];
  private _dropped = 0;
  private _generation = 0;
}
