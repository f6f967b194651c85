// Which server stream carries what the dashboard follows: the one place that knows the endpoint.
// One multiplexed stream (`/api/v1/stream`) for the queues the token may follow and its own
// notifications: each event's data names its log, and its id is the whole cursor vector.

// A source's key is its URL: a cursor resumes only the stream that wrote it (a cursor that leaves
// a log out would replay that log from its beginning).
export function streamSources(plan) {
  const search = new URLSearchParams();
  for (const pattern of plan.queues) search.append("queue", pattern);
  if (plan.notifications) search.set("notifications", "true");
  const url = `/api/v1/stream?${search}`;
  return [{ key: url, url, logOf, seqOf }];
}

export function withCursor(url, cursor) {
  return `${url}${url.includes("?") ? "&" : "?"}last_event_id=${encodeURIComponent(cursor)}`;
}

// Every frame of the stream that belongs to a log names it, `unread_count` included.
function logOf(data) {
  return data?.log;
}

// 41 for `orders` in `orders:41,billing:7,@notifications:3` (queue names hold no `,` or `:`).
function seqOf(cursor, log) {
  for (const part of cursor.split(",")) {
    const at = part.lastIndexOf(":");
    if (part.slice(0, at) === log) return Number(part.slice(at + 1));
  }
  return undefined;
}
