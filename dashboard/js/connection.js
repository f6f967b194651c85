// The browser's one connection to the server's events, shared by all its tabs: it lives in a
// SharedWorker, or in the tab that leads the others (stream.js). It resumes from its cursor
// after a drop and passes each event on once, in order.
//
// When the server says the token's queues are more logs than one stream may follow (422
// `too_many_logs`, or `stream.limit` once open), the connection goes to overview: it follows the
// notifications and, by name, the queues open in a queue view in some tab; the Queues view then
// polls its counts. A change of what it follows opens the new stream live, and the tabs reload
// what they show (`resync`) rather than have the server replay whole logs it had not followed.

import { ApiError } from "./api.js";
import { Rates } from "./rates.js";
import { streamSources, withCursor } from "./sources.js";

const LOG_EVENTS = [
  "queue.created", "queue.updated", "queue.deleted", "queue.restored",
  "message.created", "message.claimed", "message.acked", "message.retrying", "message.dead",
  "message.redriven", "message.deleted", "message.expired", "message.released", "message.extended",
  "notification.created", "notification.read", "notification.deleted",
];
const CONTROL_EVENTS = ["unread_count", "stream.reset", "stream.expired", "stream.busy", "stream.limit"];
// When EventSource has given up, try again after this long: soon when the server could not be
// reached, later when it answered with an error (it will likely answer the same for a while).
const RETRY_MS = 3000;
const REFUSED_RETRY_MS = 30000;
// At most this often, a tab's word that the queues fit one stream again is tried.
const REPLAN_MS = 30000;

export class Connection {
  constructor(send) {
    this.send = send; // (message) => void: to every tab
    this.rates = new Rates();
    this.state = "idle";
    this.sources = [];
    this.plan = null; // what the tabs asked to follow
    this.overview = null; // {logs, limit} once the server said the plan is too many logs
    this.views = new Map(); // tab -> the queue its queue view shows
    this.planKey = null;
    this.positions = new Map(); // log -> last sequence passed on
    this.cursors = {}; // source key -> its last event id, to resume from
    this.everOpen = false;
    this.replannedAt = -Infinity;
  }

  follow(plan, cursors) {
    if (this.plan && JSON.stringify(plan) !== JSON.stringify(this.plan)) this.setOverview(null);
    this.plan = plan;
    this.open(cursors);
  }

  // A tab's queue view shows `queue` (null: none); in overview, the stream follows it.
  view(tab, queue) {
    if (queue) this.views.set(tab, queue);
    else this.views.delete(tab);
    if (this.overview && this.plan) this.open();
  }

  // What the stream follows now: the plan, or in overview the notifications and the open queues.
  current() {
    if (!this.overview) return this.plan;
    const room = (this.overview.limit ?? Infinity) - (this.plan.notifications ? 1 : 0);
    const queues = [...new Set(this.views.values())].sort().slice(0, Math.max(0, room));
    return { ...this.plan, queues };
  }

  open(cursors) {
    const plan = this.current();
    const key = JSON.stringify(plan);
    if (key === this.planKey) return;
    const kept = cursors ?? this.cursors;
    // Tabs that showed something while another stream (or none) fed them reload it once the new
    // stream is open, unless it resumes the very stream that wrote their cursor.
    const shown = this.planKey !== null || Object.keys(kept).length > 0;
    this.close();
    this.planKey = key;
    this.cursors = { ...kept };
    this.sources = streamSources(plan).map((spec) => this.start(spec, shown && !this.cursors[spec.key]));
    this.updateState();
  }

  start(spec, resync) {
    const source = { spec, events: null, timer: null, open: false, resync };
    this.connect(source);
    return source;
  }

  // Overview from the server's word: true when the stream changed for it.
  goOverview({ logs = null, limit = null } = {}) {
    const before = this.planKey;
    this.setOverview({ logs, limit });
    this.open();
    return this.planKey !== before;
  }

  // A tab counted few enough queues for one stream: follow the whole plan again (should the
  // server still count too many, it says so and overview comes back).
  replan() {
    if (!this.overview || !this.plan || Date.now() - this.replannedAt < REPLAN_MS) return;
    this.replannedAt = Date.now();
    this.setOverview(null);
    this.open();
  }

  setOverview(overview) {
    if (JSON.stringify(overview) === JSON.stringify(this.overview)) return;
    this.overview = overview;
    this.send({ kind: "overview", overview });
  }

  connect(source) {
    const cursor = this.cursors[source.spec.key];
    // Same origin: the session cookie goes with it, and no token sits in the URL.
    const events = new EventSource(cursor ? withCursor(source.spec.url, cursor) : source.spec.url);
    source.events = events;
    events.onopen = () => {
      source.open = this.everOpen = true;
      this.updateState();
      if (source.resync) this.send({ kind: "resync" });
      source.resync = false;
    };
    events.onerror = () => {
      source.open = false;
      if (events.readyState === EventSource.CLOSED) this.failed(source);
      this.updateState();
    };
    for (const type of [...LOG_EVENTS, ...CONTROL_EVENTS]) {
      events.addEventListener(type, (event) => this.receive(source, event));
    }
  }

  // EventSource gives up for good on any answer but a 200 stream, and does not say which: ask
  // the same URL again to learn why, then sign the tabs out (401), follow less (too many logs),
  // or say so and try again.
  async failed(source) {
    source.events = null;
    const why = await probe(source.spec.url);
    if (!this.sources.includes(source)) return;
    if (why.status === 401) return this.signedOut(why.message ?? "the session ended");
    if (why.code === "too_many_logs" && this.goOverview(why.details)) return;
    if (why.message) this.send({ kind: "problem", message: why.message });
    source.timer = setTimeout(() => this.connect(source), why.status ? REFUSED_RETRY_MS : RETRY_MS);
  }

  receive(source, event) {
    const data = JSON.parse(event.data);
    const type = event.type;
    if (type === "stream.expired") return this.signedOut(data.reason === "token_revoked" ? "the token was revoked" : "the token expired");
    if (type === "stream.busy") return this.setState("busy");
    // Unless that changes what it follows, the stream ends here and its next answer (422) says more.
    if (type === "stream.limit") return void this.goOverview({ limit: data.limit });
    const log = source.spec.logOf(data, type);
    if (type === "stream.reset") {
      this.positions.delete(log);
      return this.send({ kind: "reset", log, data });
    }
    if (CONTROL_EVENTS.includes(type) || !event.lastEventId) return this.send({ kind: "event", type, log, seq: null, data });
    this.cursors[source.spec.key] = event.lastEventId;
    const seq = source.spec.seqOf(event.lastEventId, log);
    if (Number.isFinite(seq)) {
      if (seq <= (this.positions.get(log) ?? 0)) return; // passed on already
      this.positions.set(log, seq);
    }
    this.rates.count(type, data);
    this.send({ kind: "event", type, log, seq, data, cursors: this.cursors });
  }

  updateState() {
    if (!this.sources.length) return;
    const open = this.sources.every((source) => source.open);
    this.setState(open ? "live" : this.everOpen ? "reconnecting" : "connecting");
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.send({ kind: "state", state });
  }

  snapshot() {
    return { kind: "snapshot", state: this.state, rates: this.rates.snapshot(), cursors: this.cursors, overview: this.overview };
  }

  signedOut(message) {
    this.close();
    this.plan = null;
    this.setOverview(null);
    this.setState("signed-out");
    this.send({ kind: "signed-out", message });
  }

  close() {
    for (const source of this.sources) {
      source.events?.close();
      clearTimeout(source.timer);
    }
    this.sources = [];
    this.planKey = null;
    this.positions.clear();
    this.cursors = {};
    this.everOpen = false;
  }
}

// `{status, code, message, details}` of a stream URL's answer when it is not a stream; status 0
// when unreachable.
async function probe(url) {
  const aborting = new AbortController();
  try {
    const answer = await fetch(url, { credentials: "same-origin", signal: aborting.signal });
    if (answer.ok) return { status: 0 }; // a stream after all: try again
    const error = (await answer.json().catch(() => null))?.error;
    if (!error) return { status: answer.status };
    const failure = new ApiError(answer.status, error.code, error.message, error.details);
    const fields = failure.code === "validation_error" ? failure.fields : []; // each field's problems
    const message = [failure.message, ...fields].join(": ");
    return { status: answer.status, code: failure.code, message, details: failure.details };
  } catch {
    return { status: 0 };
  } finally {
    aborting.abort();
  }
}
