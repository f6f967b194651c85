// The browser's one connection to the server's events, shared by all its tabs: it lives in a
// SharedWorker, or in the tab that leads the others (stream.js). It resumes from its cursor
// after a drop and passes each event on once, in order.

import { Rates } from "./rates.js";
import { streamSources, withCursor } from "./sources.js";

const LOG_EVENTS = [
  "queue.created", "queue.updated", "queue.deleted", "queue.restored",
  "message.created", "message.claimed", "message.acked", "message.retrying", "message.dead",
  "message.redriven", "message.deleted", "message.expired", "message.released", "message.extended",
  "notification.created", "notification.read", "notification.deleted",
];
const CONTROL_EVENTS = ["unread_count", "stream.reset", "stream.expired", "stream.busy"];
// When EventSource has given up, try again after this long: soon when the server could not be
// reached, later when it answered with an error (it will likely answer the same for a while).
const RETRY_MS = 3000;
const REFUSED_RETRY_MS = 30000;

export class Connection {
  constructor(send) {
    this.send = send; // (message) => void: to every tab
    this.rates = new Rates();
    this.state = "idle";
    this.sources = [];
    this.planKey = null;
    this.positions = new Map(); // log -> last sequence passed on
    this.cursors = {}; // source key -> its last event id, to resume from
    this.everOpen = false;
  }

  follow(plan, cursors) {
    const key = JSON.stringify(plan);
    if (key === this.planKey) return;
    const kept = cursors ?? this.cursors;
    this.close();
    this.planKey = key;
    this.cursors = { ...kept };
    this.sources = streamSources(plan).map((spec) => this.open(spec));
    this.updateState();
  }

  open(spec) {
    const source = { spec, events: null, timer: null, open: false };
    this.connect(source);
    return source;
  }

  connect(source) {
    const cursor = this.cursors[source.spec.key];
    // Same origin: the session cookie goes with it, and no token sits in the URL.
    const events = new EventSource(cursor ? withCursor(source.spec.url, cursor) : source.spec.url);
    source.events = events;
    events.onopen = () => {
      source.open = this.everOpen = true;
      this.updateState();
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
  // the same URL again to learn why, then sign the tabs out (401), or say so and try again.
  async failed(source) {
    source.events = null;
    const why = await probe(source.spec.url);
    if (!this.sources.includes(source)) return;
    if (why.status === 401) return this.signedOut(why.message ?? "the session ended");
    if (why.message) this.send({ kind: "problem", message: why.message });
    source.timer = setTimeout(() => this.connect(source), why.status ? REFUSED_RETRY_MS : RETRY_MS);
  }

  receive(source, event) {
    const data = JSON.parse(event.data);
    const type = event.type;
    if (type === "stream.expired") return this.signedOut(data.reason === "token_revoked" ? "the token was revoked" : "the token expired");
    if (type === "stream.busy") return this.setState("busy");
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
    return { kind: "snapshot", state: this.state, rates: this.rates.snapshot(), cursors: this.cursors };
  }

  signedOut(message) {
    this.close();
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

// `{status, message}` of a stream URL's answer when it is not a stream; status 0 when unreachable.
async function probe(url) {
  const aborting = new AbortController();
  try {
    const answer = await fetch(url, { credentials: "same-origin", signal: aborting.signal });
    if (answer.ok) return { status: 0 }; // a stream after all: try again
    const body = await answer.json().catch(() => null);
    return { status: answer.status, message: body?.error?.message };
  } catch {
    return { status: 0 };
  } finally {
    aborting.abort();
  }
}
