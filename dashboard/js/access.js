// What the signed-in token may do, read from its scopes as the server reads them (DECISIONS §19).

// A shell-style glob, where `*` also matches dots (Python's fnmatchcase).
function globRegExp(pattern) {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[" && pattern.indexOf("]", i + 2) > i) {
      const end = pattern.indexOf("]", i + 2);
      let set = pattern.slice(i + 1, end).replace(/\\/g, "\\\\");
      if (set.startsWith("!")) set = `^${set.slice(1)}`;
      source += `[${set}]`;
      i = end;
    } else source += c.replace(/[.+^${}()|\\\]]/g, "\\$&");
  }
  return new RegExp(`^${source}$`, "s");
}

export class Access {
  constructor(me) {
    this.subject = me.subject;
    this.scopes = me.scopes;
    this.expiresAt = me.expires_at;
    this.admin = me.scopes.includes("admin");
    this.grants = me.scopes
      .map((scope) => scope.split(":"))
      .filter((parts) => parts.length >= 2)
      .map(([action, ...rest]) => ({ action, pattern: rest.join(":"), match: globRegExp(rest.join(":")) }));
  }

  can(action, queue) {
    return this.admin || this.grants.some((g) => g.action === action && g.match.test(queue));
  }

  // Patterns of the queues this token may follow: what the one stream asks for.
  patterns(action = "subscribe") {
    if (this.admin) return ["*"];
    return [...new Set(this.grants.filter((g) => g.action === action).map((g) => g.pattern))];
  }

  get managesSome() {
    return this.admin || this.grants.some((g) => g.action === "manage");
  }
}
