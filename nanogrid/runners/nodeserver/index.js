'use strict';
// The node server: the idle process inside every node sandbox, which runs a function on
// request in a worker thread it started before the request came. Stdlib only (node >= 18),
// and this directory is all of it: copied next to each sandbox, it is bind-mounted into
// containers and started there as `node nodeserver SOCKET` (node runs a directory's
// index.js), or started on the host by the process runner (after
// nanogrid/runners/forkserver/sandbox.py's setup, which passes `{"ready_fd": n, "ready_line": ...}`:
// the line to write there once it serves).
//
// Node cannot fork and cannot receive file descriptors, so instead of the python fork
// server's fork-per-call, a `worker_threads` Worker waits; a call hands it the function, and
// its stdio travels through this server. The Worker serves the next call too, from a fresh
// module registry; one that cannot (`process.exit(n)` ends only that Worker, with code n; a
// timeout is `worker.terminate()`) is replaced by a new one (~25 ms) between runs, off the
// next call's path.
//
//   index.js     its start: `node <this directory> SOCKET [OPTIONS]`
//   server.js    one call at a time: its stdin as fd 0, its output relayed, its end
//   protocol.js  the frames on the socket
//   arming.js    the Worker that waits for the next call: the last call's or a new one
//   preload.js   import-warm: which files the Workers preload, and which were left out
//   worker.js    what runs inside each Worker: boots, preloads (vetted), runs call after call
//
// Every file is loaded here, at start; nothing is read from this directory later. The
// Workers run worker.js's source, not the file: a function's own `require('./worker')`
// resolves next to the function, as `node main.js` would.

const { Server } = require('./server');

function main(argv) {
  const socketPath = argv[0];
  const options = argv[1] ? JSON.parse(argv[1]) : {};
  process.umask(0o077);
  process.on('SIGTERM', () => process.exit(0));
  new Server(socketPath).listen(options.ready_fd, options.ready_line);
}

main(process.argv.slice(2));
