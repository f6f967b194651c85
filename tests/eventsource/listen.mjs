// A WHATWG EventSource (the `eventsource` package) on URL, printing what it sees as JSON lines:
// {"kind": "open"|"error"|"event", ...}. Used by tests/test_http.py; stops when its stdin closes.
import { EventSource } from "eventsource";

const [url, ...types] = process.argv.slice(2);
const source = new EventSource(url);
const say = (line) => process.stdout.write(JSON.stringify({ ...line, at: Date.now() / 1000 }) + "\n");
source.onopen = () => say({ kind: "open" });
source.onerror = (error) => say({ kind: "error", code: error.code ?? null, readyState: source.readyState });
for (const type of types) {
  source.addEventListener(type, (event) => say({ kind: "event", type, data: event.data, id: event.lastEventId }));
}
process.stdin.on("end", () => { source.close(); process.exit(0); });
process.stdin.resume();
