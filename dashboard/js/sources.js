// Which server streams carry what the dashboard follows: the one place that knows the endpoints.
// Today one stream per log (the notifications and each queue shown); the multiplexed
// `/api/v1/stream` replaces them with one.

const NOTIFICATIONS = "@notifications";
const MAX_QUEUE_STREAMS = 4; // browsers allow six connections per origin over HTTP/1.1

export function streamSources(plan) {
  const sources = [];
  if (plan.notifications) {
    sources.push({ key: NOTIFICATIONS, url: "/api/v1/notifications/stream", logOf: () => NOTIFICATIONS, seqOf: Number });
  }
  for (const queue of (plan.names ?? []).slice(0, MAX_QUEUE_STREAMS)) {
    const url = `/api/v1/queues/${encodeURIComponent(queue)}/stream`;
    sources.push({ key: queue, url, logOf: () => queue, seqOf: Number });
  }
  return sources;
}

export function withCursor(url, cursor) {
  return `${url}${url.includes("?") ? "&" : "?"}last_event_id=${encodeURIComponent(cursor)}`;
}

export { NOTIFICATIONS };
