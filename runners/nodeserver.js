'use strict';
// The idle process inside every node sandbox: runs a function on request in a worker thread
// it started before the request came. Stdlib only and self-contained (node >= 18): it is
// bind-mounted into containers and started there as `node nodeserver.js SOCKET`, or started
// on the host by the process runner (after runners/forkserver/sandbox.py's setup, which
// passes `{"ready_fd": n, "ready_line": ...}`: the line to write there once it serves).
//
// Node cannot fork and cannot receive file descriptors, so instead of the python fork
// server's fork-per-call, a `worker_threads` Worker is started (~25 ms) right after each
// run, off the next call's path, and waits; a call hands it the function, and its stdio
// travels through this server. `process.exit(n)` in a Worker ends only that Worker, with
// code n; a timeout is `worker.terminate()`. A Worker's fd 0 is the process's: before each
// run the input is written to CONTROL/stdin and reopened as fd 0, and the Worker's
// `process.stdin` reads fd 0, so `fs.readFileSync(0)`, `/dev/stdin` and `process.stdin`
// all read the input.
//
// Protocol on an AF_UNIX stream socket, one client at a time, one run at a time; frames of
// a type byte, a big-endian uint32 length and a payload:
//
//   -> 'R' {"argv": [...], "cwd": ..., "env": {...}, "maxOutputBytes": n}, then 'I' stdin
//   <- 'O' stdout bytes, 'E' stderr bytes (each at most maxOutputBytes in all)
//   -> 'K' (optional: kill, e.g. on timeout)
//   <- 'X' {"exitCode": n, "killed": bool, "durationNs": n, "maxrssBytes": n,
//          "dropped": {"stdout": n, "stderr": n}}
//
// argv is [interpreter, script, ...args]: the script runs as `node script args` would
// (require.main, process.argv, exit codes, uncaught errors on stderr with exit code 1).

const fs = require('fs');
const net = require('net');
const path = require('path');
const { Worker } = require('worker_threads');

const HEADER = 5;
const MAX_FRAME = 64 * 1024 * 1024;

// Runs inside the Worker: waits for the run, becomes the function, reports when it ended.
// Running an empty module first loads what the module loader needs lazily (half the cost
// of a call on node 18); the function's own module is then the main one.
const BOOT_WAIT_MS = 5000;
const BOOT = `
const { parentPort, workerData } = require('worker_threads');
const Module = require('module');
Module.runMain(workerData.warmup);
Atomics.store(workerData.booted, 0, 1); // its file reads are over: fd 0 may be swapped now
Atomics.notify(workerData.booted, 0);
parentPort.once('message', (run) => {
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, run.env);
  process.argv = [process.execPath, ...run.argv.slice(1)];
  let stdin = null; // fd 0 holds the input; a Worker's own stdin would be a message port
  Object.defineProperty(process, 'stdin', {
    configurable: true,
    enumerable: true,
    get: () => stdin || (stdin = require('fs').createReadStream(null, { fd: 0, autoClose: false })),
  });
  process.on('exit', () => parentPort.postMessage(process.hrtime.bigint()));
  parentPort.unref();
  Module.runMain(process.argv[1]);
});
`;

function frame(type, payload) {
  const body = Buffer.isBuffer(payload) ? payload : Buffer.from(JSON.stringify(payload));
  const header = Buffer.alloc(HEADER);
  header.write(type, 0, 'latin1');
  header.writeUInt32BE(body.length, 1);
  return Buffer.concat([header, body]);
}

function peakRss() {
  const match = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'latin1'));
  return match ? Number(match[1]) * 1024 : 0;
}

function resetPeakRss() {
  try {
    fs.writeFileSync('/proc/self/clear_refs', '5');
  } catch {
    // an older kernel: the peak stays the server's lifetime peak
  }
}

class Server {
  constructor(socketPath) {
    this.socketPath = socketPath;
    this.stdinPath = path.join(path.dirname(socketPath), 'stdin');
    this.warmupPath = path.join(path.dirname(socketPath), 'warmup.js');
    this.armed = null;
    this.run = null;
  }

  arm() {
    const booted = new Int32Array(new SharedArrayBuffer(4));
    const worker = new Worker(BOOT, {
      eval: true, stdout: true, stderr: true, env: {}, workerData: { warmup: this.warmupPath, booted },
    });
    worker.booted = booted;
    worker.on('error', () => {}); // before a run: noticed by its exit; in a run: see start()
    worker.once('exit', () => {
      if (this.armed === worker) this.armed = null; // died waiting: re-armed on demand
    });
    this.armed = worker;
  }

  take() {
    if (this.armed === null) this.arm();
    const worker = this.armed;
    this.armed = null;
    return worker;
  }

  // The input becomes fd 0 of this process: close 0, and open() returns the lowest free fd.
  stageStdin(data) {
    fs.writeFileSync(this.stdinPath, data, { mode: 0o600 });
    fs.closeSync(0);
    const fd = fs.openSync(this.stdinPath, 'r');
    if (fd !== 0) throw new Error(`stdin reopened as fd ${fd}, not 0`);
  }

  start(conn, request, stdin) {
    process.chdir(request.cwd); // process-wide: a Worker cannot chdir, and inherits this
    const worker = this.take();
    // A Worker still booting opens files on its own thread: one could take fd 0 between
    // stageStdin's close and open. Wait (at most BOOT_WAIT_MS) until it has booted.
    Atomics.wait(worker.booted, 0, 0, BOOT_WAIT_MS);
    this.stageStdin(stdin);
    resetPeakRss();
    const cap = request.maxOutputBytes;
    const run = {
      worker, killed: false, ended: null, exitCode: null, pending: 3,
      sent: { stdout: 0, stderr: 0 }, dropped: { stdout: 0, stderr: 0 },
    };
    this.run = run;
    const emit = (name, type, chunk) => {
      const room = Math.max(0, cap - run.sent[name]);
      if (chunk.length > room) run.dropped[name] += chunk.length - room;
      if (room > 0) {
        const part = chunk.subarray(0, room);
        run.sent[name] += part.length;
        conn.write(frame(type, part));
      }
    };
    const relay = (name, type) => {
      const stream = worker[name];
      stream.on('data', (chunk) => emit(name, type, chunk));
      stream.once('end', () => this.settle(conn, run));
    };
    relay('stdout', 'O');
    relay('stderr', 'E');
    worker.removeAllListeners('error');
    worker.removeAllListeners('exit');
    worker.on('message', (ended) => { run.ended = ended; });
    worker.on('error', (error) => {
      // What node prints for an uncaught exception (the Worker's own exit code is 1).
      const text = error && error.stack ? error.stack : `Uncaught ${String(error)}`;
      emit('stderr', 'E', Buffer.from(`${text}\n\nNode.js ${process.version}\n`));
    });
    worker.once('exit', (code) => {
      run.exitCode = code;
      this.settle(conn, run);
    });
    run.started = process.hrtime.bigint();
    const argv = [request.argv[0], path.resolve(request.argv[1]), ...request.argv.slice(2)];
    worker.postMessage({ argv, env: request.env });
  }

  kill() {
    if (this.run === null) return;
    this.run.killed = true;
    this.run.worker.terminate();
  }

  // A run is over once the Worker exited and both of its output streams ended.
  settle(conn, run) {
    run.pending -= 1;
    if (run.pending > 0 || this.run !== run) return;
    this.run = null;
    const ended = run.ended === null ? process.hrtime.bigint() : BigInt(run.ended);
    conn.write(frame('X', {
      exitCode: run.exitCode,
      killed: run.killed,
      durationNs: Number(ended - run.started),
      maxrssBytes: peakRss(),
      dropped: run.dropped,
    }));
    this.arm();
  }

  serve(conn) {
    let buffer = Buffer.alloc(0);
    let request = null;
    conn.on('data', (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      while (buffer.length >= HEADER) {
        const type = buffer.toString('latin1', 0, 1);
        const length = buffer.readUInt32BE(1);
        if (length > MAX_FRAME) return conn.destroy();
        if (buffer.length < HEADER + length) break;
        const body = buffer.subarray(HEADER, HEADER + length);
        buffer = buffer.subarray(HEADER + length);
        if (type === 'R' && this.run === null) {
          request = JSON.parse(body.toString('utf8'));
        } else if (type === 'I' && request !== null) {
          const run = request;
          request = null;
          this.start(conn, run, Buffer.from(body));
        } else if (type === 'K') {
          this.kill();
        } else {
          return conn.destroy();
        }
      }
    });
    conn.on('error', () => {});
    conn.on('close', () => this.kill()); // the agent went away: do not leave the run behind
  }

  listen(readyFd, readyLine) {
    // Both are made while the directory is writable (the Docker runner seals it later).
    fs.writeFileSync(this.stdinPath, '', { mode: 0o600 });
    fs.writeFileSync(this.warmupPath, '', { mode: 0o400 });
    this.arm();
    if (fs.existsSync(this.socketPath)) fs.unlinkSync(this.socketPath);
    const server = net.createServer({ allowHalfOpen: false }, (conn) => this.serve(conn));
    server.maxConnections = 1;
    server.listen(this.socketPath, () => {
      if (readyFd !== undefined) {
        fs.writeSync(readyFd, readyLine || 'ready\n');
        fs.closeSync(readyFd);
      }
    });
  }
}

function main(argv) {
  const socketPath = argv[0];
  const options = argv[1] ? JSON.parse(argv[1]) : {};
  process.umask(0o077);
  process.on('SIGTERM', () => process.exit(0));
  new Server(socketPath).listen(options.ready_fd, options.ready_line);
}

main(process.argv.slice(2));
