// One message in detail: its body (pretty-printed when JSON), headers, attempts, last error, events.

import { api, query, queuePath } from "./api.js";
import { clock, dialog, fullTime, h, replace, toast } from "./dom.js";
import { confirmDialog } from "./queues.js";

const SCAN_EVENTS = 1000; // how far back the log is searched for the message's events
const EVENTS_PAGE = 200;

export function shortId(id) {
  return typeof id === "string" ? `…${id.slice(-8)}` : "";
}

export function bodyText(body) {
  return typeof body === "string" ? body : JSON.stringify(body);
}

export function preview(body, length = 60) {
  const text = bodyText(body) ?? "";
  return h("span", { class: "preview", title: text.slice(0, 500) }, text.length > length ? `${text.slice(0, length)}…` : text);
}

export async function messageDialog(queue, id, { access, stream }) {
  let message;
  try {
    message = await api(queuePath(queue, `/messages/${encodeURIComponent(id)}`));
  } catch (error) {
    return toast(error.message, "error");
  }
  const meta = h("dl", { class: "meta" });
  const events = h("ol", { class: "timeline" });
  const body = h("pre", { class: "code", tabindex: "0" });
  const error = h("pre", { class: "code error-text" });
  const headers = h("table", { class: "table compact" });
  const actions = h("div", { class: "dialog-actions" });
  const content = [
    meta,
    h("h3", {}, "Body"), body,
    h("section", { class: "last-error" }, h("h3", {}, "Last error"), error),
    h("h3", {}, "Headers"), headers,
    h("h3", {}, "Events"), events,
    actions,
  ];
  const off = stream.on("event", (event) => {
    if (event.log !== queue || event.data?.id !== id || event.seq === null) return;
    message = { ...event.data, body: message.body };
    paint();
    events.append(eventRow(event.seq, event.type, new Date().toISOString()));
  });
  dialog(`Message ${shortId(id)}`, content, { wide: true, onclose: off });
  paint();
  loadEvents(queue, id).then((found) => replace(events, found.length ? found.map((e) => eventRow(e.seq, e.type, e.at)) : h("li", { class: "muted" }, "None in the recent log.")));

  function paint() {
    const rows = [
      ["ID", h("span", { class: "mono" }, message.id)],
      ["Status", h("span", { class: `chip ${message.status}` }, message.status)],
      ["Priority", message.priority],
      ["Type", message.type || "—"],
      ["Attempts", String(message.attempts)],
      ["Content type", message.content_type],
      ["Created", fullTime(message.created_at)],
      ["Available at", fullTime(message.available_at)],
      ["Lease expires", fullTime(message.lease_expires_at)],
      ["Finished", fullTime(message.finished_at)],
      ["Idempotency key", message.idempotency_key ?? "—"],
    ];
    replace(meta, rows.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
    body.textContent = message.content_type.startsWith("application/json") ? JSON.stringify(message.body, null, 2) : message.body;
    error.textContent = message.last_error ?? "";
    error.parentElement.hidden = !message.last_error;
    const pairs = Object.entries(message.headers ?? {});
    replace(headers, pairs.length ? pairs.map(([k, v]) => h("tr", {}, h("th", { scope: "row", class: "mono" }, k), h("td", { class: "mono" }, v))) : h("tr", {}, h("td", { class: "muted" }, "No headers")));
    replace(actions,
      message.status === "dead" && access.can("manage", queue) ? h("button", { type: "button", onclick: () => redrive() }, "Redrive") : null,
      access.can("manage", queue) ? h("button", { class: "danger", type: "button", onclick: () => remove() }, "Delete message") : null);
  }

  async function redrive() {
    try {
      await api(queuePath(queue, "/redrive"), { method: "POST", json: { ids: [id] } });
      toast("Sent back to pending");
    } catch (failure) {
      toast(failure.message, "error");
    }
  }

  async function remove() {
    if (!(await confirmDialog("Delete this message?", "It is removed for good; its events stay in the log.", "Delete"))) return;
    try {
      await api(queuePath(queue, `/messages/${encodeURIComponent(id)}`), { method: "DELETE" });
      toast("Deleted");
    } catch (failure) {
      toast(failure.message, "error");
    }
  }
}

function eventRow(seq, type, at) {
  return h("li", {}, h("span", { class: "mono muted" }, `#${seq}`), " ", h("b", {}, type), " ", h("time", { class: "muted small", datetime: at }, clock(at)));
}

// The message's events among the last SCAN_EVENTS of the queue's log.
async function loadEvents(queue, id) {
  const first = await api(`${queuePath(queue, "/events")}${query({ after: 0, limit: 1 })}`);
  const oldest = first.items[0]?.seq ?? 1;
  let after = Math.max(oldest - 1, oldest + first.total - 1 - SCAN_EVENTS);
  const found = [];
  for (;;) {
    const page = await api(`${queuePath(queue, "/events")}${query({ after, limit: EVENTS_PAGE })}`);
    found.push(...page.items.filter((e) => e.data?.id === id));
    if (!page.has_more || !page.items.length) return found;
    after = page.items.at(-1).seq;
  }
}
