// A queue: its live event feed, its messages (filters, paging, detail), publishing, redrive, exports.

import { api, query, queuePath } from "./api.js";
import { legend, throughputChart } from "./chart.js";
import { connectionBadge } from "./shell.js";
import { clock, count, dialog, field, h, replace, toast } from "./dom.js";
import { download, redo, send } from "./icons.js";
import { messageDialog, preview, shortId } from "./message.js";
import { applyMessageEvent, confirmDialog, countChips, STATUSES } from "./queues.js";

const FEED_MAX = 500; // rows the feed keeps; older ones are counted, not shown
const EVENTS_PAGE = 200;
const PAGE = 25;
const PRIORITIES = ["low", "normal", "high", "urgent"];

export function queueView(main, { access, stream }, name, messageId) {
  const manage = access.can("manage", name);
  const state = { queue: null, page: 0, total: 0, rows: new Map() };
  const chips = h("div", { class: "chips" });
  const chart = throughputChart({ width: 240, height: 44 });
  const rates = h("span", { class: "rates" });
  const description = h("p", { class: "muted" });
  const redrive = manage ? h("button", { type: "button", onclick: () => redriveAll() }, redo(), "Redrive dead") : null;
  const csv = h("a", { class: "button", download: "" }, download(), "CSV");
  const xlsx = h("a", { class: "button", download: "" }, download(), "XLSX");
  const publish = access.can("publish", name) ? h("button", { class: "primary", type: "button", onclick: () => publishDialog(name) }, send(), "Publish") : null;

  const filters = {
    status: h("select", { name: "status", "aria-label": "Status" }, h("option", { value: "" }, "Any status"), STATUSES.map((s) => h("option", { value: s }, s))),
    type: h("input", { name: "type", type: "search", placeholder: "Type", "aria-label": "Type", maxlength: 64 }),
    priority: h("select", { name: "priority", "aria-label": "Priority" }, h("option", { value: "" }, "Any priority"), PRIORITIES.map((p) => h("option", { value: p }, p))),
  };
  for (const control of Object.values(filters)) control.addEventListener("change", () => ((state.page = 0), loadMessages()));
  const tbody = h("tbody");
  const pageInfo = h("span", { class: "muted small" });
  const newer = h("button", { class: "small", type: "button", onclick: () => turn(-1) }, "‹ Newer");
  const older = h("button", { class: "small", type: "button", onclick: () => turn(1) }, "Older ›");

  const feedList = h("ol", { class: "feed", "aria-label": "Events", "aria-live": "off" });
  const feedCount = h("span", { class: "muted small", "data-testid": "feed-count" });
  const earlier = h("li", { class: "earlier", hidden: true });
  const badge = connectionBadge(stream);
  const feed = { last: 0, hidden: 0, loading: true, buffered: [], generation: 0 };

  replace(
    main,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/queues" }, "Queues"), h("span", { "aria-hidden": "true" }, " / ")),
    h("div", { class: "view-head" }, h("div", {}, h("h1", {}, name), description), h("div", { class: "actions" }, publish, redrive, csv, xlsx)),
    h("section", { class: "stats card" }, chips, h("div", { class: "throughput big" }, chart.element, rates)),
    h("div", { class: "queue-layout" },
      h("section", { class: "card messages", "aria-label": "Messages" },
        h("header", { class: "card-head" }, h("h2", {}, "Messages"), h("div", { class: "filters" }, filters.status, filters.type, filters.priority)),
        h("div", { class: "table-wrap" },
          h("table", { class: "table" },
            h("thead", {}, h("tr", {}, ["Message", "Status", "Type", "Priority", "Tries", "Body", "Created"].map((c) => h("th", { scope: "col" }, c)))),
            tbody)),
        h("footer", { class: "pager" }, pageInfo, h("div", {}, newer, older))),
      h("section", { class: "card feed-card", "aria-label": "Live events" },
        h("header", { class: "card-head" }, h("h2", {}, "Live events"), badge.element, feedCount),
        feedList)),
  );
  feedList.append(earlier);

  async function loadQueue() {
    state.queue = await api(queuePath(name));
    replace(chips, countChips(state.queue.messages));
    description.textContent = state.queue.description || `owned by ${state.queue.owner}`;
  }

  function filterQuery() {
    return { status: filters.status.value, type: filters.type.value.trim(), priority: filters.priority.value };
  }

  function exports() {
    csv.href = `/api/v1${queuePath(name, "/messages")}${query({ ...filterQuery(), format: "csv" })}`;
    xlsx.href = `/api/v1${queuePath(name, "/messages")}${query({ ...filterQuery(), format: "xlsx" })}`;
  }

  // Newest first: the API pages oldest first, so a page's offset is counted from the end.
  async function loadMessages() {
    exports();
    const where = filterQuery();
    const head = await api(`${queuePath(name, "/messages")}${query({ ...where, limit: 1 })}`);
    state.total = head.total;
    const end = state.total - state.page * PAGE;
    const offset = Math.max(0, end - PAGE);
    const page = end > 0 ? await api(`${queuePath(name, "/messages")}${query({ ...where, limit: Math.min(PAGE, end), offset })}`) : { items: [] };
    state.rows.clear();
    replace(tbody, page.items.reverse().map((m) => messageRow(m)));
    if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No messages match.")));
    pageInfo.textContent = state.total ? `${count(offset + 1)}–${count(end)} of ${count(state.total)}` : "";
    newer.disabled = state.page === 0;
    older.disabled = offset === 0;
  }

  function turn(by) {
    state.page = Math.max(0, state.page + by);
    loadMessages();
  }

  function messageRow(message) {
    const open = h("button", { class: "link mono", type: "button", onclick: () => messageDialog(name, message.id, { access, stream }) }, shortId(message.id));
    const status = h("span", { class: `chip ${message.status}` }, message.status);
    const tries = h("td", { class: "num" }, String(message.attempts));
    const element = h("tr", { dataset: { id: message.id } },
      h("td", {}, open), h("td", {}, status), h("td", { class: "mono small" }, message.type || "—"),
      h("td", {}, h("span", { class: `pill ${message.priority}` }, message.priority)), tries,
      h("td", { class: "body-cell" }, preview(message.body)), h("td", { class: "small muted nowrap" }, clock(message.created_at)));
    state.rows.set(message.id, { status, tries });
    return element;
  }

  function matches(message) {
    const where = filterQuery();
    return (!where.status || where.status === message.status) && (!where.type || where.type === message.type) && (!where.priority || where.priority === message.priority);
  }

  function onMessage(type, data) {
    if (state.queue && applyMessageEvent(state.queue.messages, type, data)) replace(chips, countChips(state.queue.messages));
    const row = state.rows.get(data.id);
    if (row) {
      row.status.className = `chip ${data.status}`;
      row.status.textContent = type === "message.deleted" || type === "message.expired" ? "deleted" : data.status;
      row.tries.textContent = String(data.attempts);
    } else if (type === "message.created" && state.page === 0 && matches(data)) {
      tbody.querySelector(".empty")?.closest("tr")?.remove();
      tbody.prepend(messageRow(data));
      if (tbody.rows.length > PAGE) tbody.lastElementChild.remove();
      state.total += 1;
      pageInfo.textContent = `1–${count(Math.min(PAGE, state.total))} of ${count(state.total)}`;
    }
  }

  // The feed: the retained log (its last FEED_MAX events), then live events, each exactly once.
  // A reload while an earlier one still reads wins: the earlier one stops.
  async function loadFeed() {
    const mine = feed.generation;
    const first = await api(`${queuePath(name, "/events")}${query({ after: 0, limit: 1 })}`);
    if (mine !== feed.generation) return;
    const oldest = first.items[0]?.seq ?? 1;
    const head = oldest + first.total - 1;
    feed.last = Math.max(oldest - 1, head - FEED_MAX);
    feed.hidden = feed.last - (oldest - 1);
    for (;;) {
      const page = await api(`${queuePath(name, "/events")}${query({ after: feed.last, limit: EVENTS_PAGE })}`);
      if (mine !== feed.generation) return;
      for (const event of page.items) addEvent(event.seq, event.type, event.data, event.at);
      if (!page.has_more || !page.items.length) break;
    }
    feed.loading = false;
    for (const event of feed.buffered.splice(0)) addEvent(event.seq, event.type, event.data);
    paintCount();
  }

  function addEvent(seq, type, data, at) {
    if (seq <= feed.last) return; // shown already
    feed.last = seq;
    const what = type.startsWith("message.") ? [h("span", { class: "mono" }, shortId(data.id)), " ", preview(data.body, 90)] : data.description || data.name;
    const item = h("li", { class: `event t-${type.split(".")[1]}`, dataset: { seq, type } },
      h("span", { class: "seq mono" }, `#${seq}`),
      h("span", { class: "type" }, type),
      h("span", { class: "what" }, what),
      h("time", { class: "small muted", datetime: at ?? new Date().toISOString() }, clock(at ?? Date.now())));
    if (type.startsWith("message.") && type !== "message.deleted" && type !== "message.expired") {
      item.tabIndex = 0;
      item.classList.add("clickable");
      const open = () => messageDialog(name, data.id, { access, stream });
      item.addEventListener("click", open);
      item.addEventListener("keydown", (event) => event.key === "Enter" && open());
    }
    earlier.after(item);
    if (feedList.children.length - 1 > FEED_MAX) {
      feedList.lastElementChild.remove();
      feed.hidden += 1;
    }
    if (!feed.loading) paintCount();
  }

  function paintCount() {
    const shown = feedList.children.length - 1;
    feedCount.textContent = `${count(shown + feed.hidden)} events`;
    earlier.hidden = feed.hidden === 0;
    earlier.textContent = `${count(feed.hidden)} earlier events not shown`;
  }

  function onEvent(message) {
    if (message.log !== name) return;
    if (message.type.startsWith("message.")) onMessage(message.type, message.data);
    if (message.type === "queue.updated") description.textContent = message.data.description || `owned by ${message.data.owner}`;
    if (message.type === "queue.deleted") toast(`${name} was deleted`, "error");
    if (message.seq === null) return;
    if (feed.loading) feed.buffered.push(message);
    else addEvent(message.seq, message.type, message.data);
  }

  async function redriveAll() {
    const dead = state.queue?.messages.dead ?? 0;
    if (!dead) return toast("No dead messages to redrive.");
    if (!(await confirmDialog(`Redrive ${count(dead)} dead ${dead === 1 ? "message" : "messages"}?`, "They go back to pending with their attempts reset, and workers take them again.", "Redrive"))) return;
    try {
      const done = await api(queuePath(name, "/redrive"), { method: "POST", json: {} });
      toast(`Redrove ${count(done.items.length)} ${done.items.length === 1 ? "message" : "messages"}`);
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function draw() {
    const series = stream.rates.series(name);
    chart.draw(series);
    legend(rates, series, ["published", "acked"]);
  }

  // `resync`: the stream now follows other logs and began live; what it did not carry is reloaded.
  const offs = [stream.on("event", onEvent), stream.on("reset", (m) => m.log === name && reload()), stream.on("resync", () => reload()), badge.off];
  const ticker = setInterval(draw, 1000);
  draw();
  function reload() {
    replace(feedList, earlier);
    Object.assign(feed, { last: 0, hidden: 0, loading: true, buffered: [], generation: feed.generation + 1 });
    return Promise.all([loadQueue(), loadMessages(), loadFeed()]);
  }
  reload().then(() => messageId && messageDialog(name, messageId, { access, stream }), (error) => toast(error.message, "error"));
  return () => {
    clearInterval(ticker);
    offs.forEach((off) => off());
  };
}

const DURATION = /^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$/;
const UNIT = { "": 1, s: 1, m: 60, h: 3600, d: 86400 };

function publishDialog(name) {
  const body = h("textarea", { name: "body", rows: 7, class: "mono", required: true, placeholder: "backup done" });
  const asJson = h("input", { type: "radio", name: "format", value: "json" });
  const asText = h("input", { type: "radio", name: "format", value: "text", checked: true });
  const type = h("input", { name: "type", maxlength: 64, placeholder: "build.finished", autocomplete: "off" });
  const priority = h("select", { name: "priority" }, PRIORITIES.map((p) => h("option", { value: p, selected: p === "normal" }, p)));
  const delay = h("input", { name: "delay", placeholder: "0, 30s, 5m, 2h", autocomplete: "off" });
  const problem = h("p", { class: "form-error", role: "alert", hidden: true });
  const form = h("form", { class: "form", onsubmit: (event) => submit(event) },
    h("fieldset", { class: "segmented" }, h("legend", {}, "Body"), h("label", {}, asText, " Text"), h("label", {}, asJson, " JSON")),
    body,
    h("div", { class: "form-grid" }, field("Type", type), field("Priority", priority), field("Delay", delay, "seconds, or 30s, 5m, 2h")),
    problem,
    h("div", { class: "dialog-actions" }, h("button", { type: "button", onclick: () => node.close() }, "Cancel"), h("button", { class: "primary", type: "submit" }, send(), "Publish")),
  );
  const node = dialog(`Publish to ${name}`, form, { wide: true });
  body.focus();

  async function submit(event) {
    event.preventDefault();
    problem.hidden = true;
    try {
      const message = asJson.checked ? await publishJson() : await publishText();
      node.close();
      toast(`Published ${shortId(message.id)}`);
    } catch (error) {
      replace(problem, error.message, (error.fields ?? []).map((line) => h("span", { class: "block" }, line)));
      problem.hidden = false;
    }
  }

  function publishText() {
    const headers = { "X-Priority": priority.value };
    if (type.value.trim()) headers["X-Type"] = type.value.trim();
    if (delay.value.trim()) headers["X-Delay"] = delay.value.trim();
    return api(queuePath(name, "/messages"), { method: "POST", text: body.value, headers });
  }

  function publishJson() {
    let value;
    try {
      value = JSON.parse(body.value);
    } catch (error) {
      throw new Error(`The body is not valid JSON: ${error.message}`);
    }
    const envelope = { body: value, priority: priority.value };
    if (type.value.trim()) envelope.type = type.value.trim();
    if (delay.value.trim()) {
      const match = DURATION.exec(delay.value);
      if (!match) throw new Error(`Not a delay: ${delay.value} (try 30s, 5m or 2h)`);
      envelope.delay = Number(match[1]) * UNIT[match[2]];
    }
    return api(queuePath(name, "/messages"), { method: "POST", json: envelope });
  }
}
