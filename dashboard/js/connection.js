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
// When EventSource has given up (an answer that is not a stream), try again after this long.
const RETRY_MS = 3000;

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

  // EventSource gives up for good on any answer but a 200 stream: learn why, then try again.
  async failed(source) {
    source.events = null;
    const me = await fetch("/api/v1/me", { credentials: "same-origin" }).catch(() => null);
    if (me?.status === 401) {
      const body = await me.json().catch(() => null);
      this.signedOut(body?.error?.message ?? "the session ended");
      return;
    }
    if (this.sources.includes(source)) source.timer = setTimeout(() => this.connect(source), RETRY_MS);
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
    if (seq <= (this.positions.get(log) ?? 0)) return; // passed on already
    this.positions.set(log, seq);
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
