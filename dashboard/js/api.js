// The API as the dashboard calls it: JSON in and out, signed in by the session cookie.

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  // "body.priority: Input should be …" for each field the server named.
  get fields() {
    return Object.entries(this.details ?? {}).map(([where, problems]) => `${where}: ${[problems].flat().join("; ")}`);
  }
}

const signedOutListeners = new Set();

export function onSignedOut(listener) {
  signedOutListeners.add(listener);
}

export function signedOut(message) {
  for (const listener of signedOutListeners) listener(message);
}

export async function api(path, { method = "GET", json, text, headers = {} } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (text !== undefined) {
    init.body = text;
    init.headers["Content-Type"] = "text/plain; charset=utf-8";
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch {
    throw new ApiError(0, "unreachable", "The server cannot be reached. Check your connection and try again.");
  }
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (response.ok) return body;
  const error = body?.error ?? { code: `http_${response.status}`, message: response.statusText };
  const failure = new ApiError(response.status, error.code, error.message, error.details);
  if (response.status === 401 && path !== "/session") signedOut(failure.message);
  throw failure;
}

export function queuePath(queue, rest = "") {
  return `/queues/${encodeURIComponent(queue)}${rest}`;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
