// A tab's side of the browser's one event stream. Tabs never connect on their own: a SharedWorker
// holds the connection where the browser has one; elsewhere one tab leads (a Web Lock decides
// which) and passes events to the others over a BroadcastChannel. When the leader closes, the next
// tab takes the lock and resumes from the cursor the events carried.

import { Connection } from "./connection.js";
import { Rates } from "./rates.js";

const REQUESTS = new Set(["hello", "plan", "view", "replan", "stop"]);
const WORKER = new URL("./stream-worker.js", import.meta.url).href;
// The page enforces Trusted Types (its CSP): this policy admits the worker's own URL, nothing else.
const scriptUrls = globalThis.trustedTypes?.createPolicy("pombo", {
  createScriptURL: (url) => {
    if (url !== WORKER) throw new TypeError(`not the stream worker: ${url}`);
    return url;
  },
});

export class Stream extends EventTarget {
  constructor() {
    super();
    this.state = "connecting";
    this.rates = new Rates();
    this.plan = null;
    this.overview = null; // {logs, limit} while the connection follows less than the plan
    this.tab = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    this.viewing = null; // the queue this tab's queue view shows
    this.post = null;
  }

  // This tab shows `queue` in a queue view (null: none): in overview, the stream follows it.
  view(queue) {
    this.viewing = queue;
    this.post?.({ kind: "view", tab: this.tab, queue });
  }

  // The token's queues, counted by the Queues view, fit one stream again: leave overview.
  replan() {
    this.post?.({ kind: "replan" });
  }

  follow(plan) {
    this.plan = plan;
    if (!this.post) this.attach();
    this.post({ kind: "hello" });
    this.post({ kind: "plan", plan });
  }

  stop() {
    this.post?.({ kind: "stop" });
  }

  attach() {
    if (typeof SharedWorker === "function") return this.viaWorker();
    return this.viaLeader();
  }

  viaWorker() {
    const url = scriptUrls ? scriptUrls.createScriptURL(WORKER) : WORKER;
    const worker = new SharedWorker(url, { type: "module", name: "pombo-stream" });
    worker.port.onmessage = ({ data }) => this.receive(data);
    worker.port.start();
    this.post = (message) => worker.port.postMessage(message);
    addEventListener("pagehide", () => worker.port.postMessage({ kind: "bye", tab: this.tab }));
  }

  viaLeader() {
    const channel = new BroadcastChannel("pombo-stream");
    let connection = null;
    let cursors = null;
    const handle = (message) => {
      if (message.kind === "hello") channel.postMessage(connection.snapshot()), this.receive(connection.snapshot());
      else if (message.kind === "plan") connection.follow(message.plan);
      else if (message.kind === "view") connection.view(message.tab, message.queue);
      else if (message.kind === "replan") connection.replan();
      else if (message.kind === "stop") connection.signedOut("you signed out");
    };
    this.post = (message) => (connection ? handle(message) : channel.postMessage(message));
    channel.onmessage = ({ data }) => {
      if (REQUESTS.has(data.kind)) return connection && handle(data);
      if (data.kind === "views?") return this.post({ kind: "view", tab: this.tab, queue: this.viewing });
      if (data.cursors) cursors = data.cursors;
      this.receive(data);
    };
    addEventListener("pagehide", () => this.post({ kind: "view", tab: this.tab, queue: null }));
    const lead = () =>
      new Promise(() => {
        connection = new Connection((message) => {
          channel.postMessage(message);
          this.receive(message);
        });
        // What the last leader knew: how little it could follow, and which queues the tabs show.
        connection.overview = this.overview;
        connection.view(this.tab, this.viewing);
        channel.postMessage({ kind: "views?" });
        if (this.plan) connection.follow(this.plan, cursors);
      });
    if (navigator.locks) navigator.locks.request("pombo-stream-leader", lead);
    else lead();
  }

  receive(message) {
    if (message.kind === "snapshot") {
      this.rates = new Rates(message.rates);
      this.setState(message.state);
      this.setOverview(message.overview ?? null);
    } else if (message.kind === "overview") this.setOverview(message.overview);
    else if (message.kind === "resync") this.dispatchEvent(new CustomEvent("resync"));
    else if (message.kind === "state") this.setState(message.state);
    else if (message.kind === "event") {
      this.rates.count(message.type, message.data);
      this.dispatchEvent(new CustomEvent("event", { detail: message }));
    } else if (message.kind === "reset") this.dispatchEvent(new CustomEvent("reset", { detail: message }));
    else if (message.kind === "problem") this.dispatchEvent(new CustomEvent("problem", { detail: message.message }));
    else if (message.kind === "signed-out") this.dispatchEvent(new CustomEvent("signed-out", { detail: message.message }));
  }

  setOverview(overview) {
    if (JSON.stringify(overview) === JSON.stringify(this.overview)) return;
    this.overview = overview;
    this.dispatchEvent(new CustomEvent("overview", { detail: overview }));
  }

  setState(state) {
    if (state === "idle" || state === this.state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  // `listener(message)` for each event; returns the function that stops listening.
  on(kind, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(kind, wrapped);
    return () => this.removeEventListener(kind, wrapped);
  }
}
