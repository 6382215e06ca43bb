'use strict';
// The protocol on an AF_UNIX stream socket, one client at a time, one run at a time; frames
// of a type byte, a big-endian uint32 length and a payload:
//
//   -> 'R' {"argv": [...], "cwd": ..., "env": {...}, "maxOutputBytes": n, "preload": key},
//      then 'I' stdin
//   <- 'O' stdout bytes, 'E' stderr bytes (never empty; each at most maxOutputBytes in all)
//   -> 'K' (optional: kill, e.g. on timeout)
//   <- 'X' {"exitCode": n, "killed": bool, "durationNs": n, "maxrssBytes": n,
//          "dropped": {"stdout": n, "stderr": n},
//          "preload": {"preloaded": [file, ...], "left_out": {file: why}} (when it changed)}
//   -> 'A' (the run's peak is read: ready the next call's Worker now, the last one or a new
//          one, so that neither a Worker's start nor its preloading is in a run's peak;
//          without it, the next run takes the last Worker as it is or starts one)
//   <- 'W' (empty: that Worker is ready with its preloads, or none is armed; the agent
//          freezes the sandbox until its next call. Not sent when a call comes first)
//   -> 'D' (between runs, the sandbox idle long: end the Worker kept for the next call,
//          freeing its memory; the next call starts one)
//   <- 'W' (empty: it has ended)
//
// argv is [interpreter, script, ...args]: the script runs as `node script args` would
// (require.main, process.argv, exit codes, uncaught errors on stderr with exit code 1).
// "preload" is the agent's code_key, or null (see preload.js). The agent's side is
// nanogrid/runners/nodeclient.py.

const HEADER = 5;
const MAX_FRAME = 64 * 1024 * 1024;

// One frame: `payload` as it is if it is bytes, else as JSON.
function frame(type, payload) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(JSON.stringify(payload));
  const header = Buffer.alloc(HEADER);
  header.write(type, 0, 'latin1');
  header.writeUInt32BE(body.length, 1);
  return Buffer.concat([header, body]);
}

// Calls `handle(type, body)` for each whole frame `conn` sends, in order. A frame longer
// than MAX_FRAME, or one `handle` refuses (returns false), ends the connection.
function readFrames(conn, handle) {
  let buffer = Buffer.alloc(0);
  conn.on('data', (chunk) => {
    buffer = Buffer.concat([buffer, chunk]);
    while (buffer.length >= HEADER) {
      const type = buffer.toString('latin1', 0, 1);
      const length = buffer.readUInt32BE(1);
      if (length > MAX_FRAME) return conn.destroy();
      if (buffer.length < HEADER + length) break;
      const body = buffer.subarray(HEADER, HEADER + length);
      buffer = buffer.subarray(HEADER + length);
      if (handle(type, body) === false) return conn.destroy();
    }
  });
}

module.exports = { frame, readFrames };
