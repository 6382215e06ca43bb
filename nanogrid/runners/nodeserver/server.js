'use strict';
// The server's socket and its calls, one at a time. A Worker's fd 0 is the process's: before
// each run the input is written to CONTROL/stdin (emptied after it) and reopened as fd 0, so
// `fs.readFileSync(0)`, `/dev/stdin` and the Worker's `process.stdin` all read the input. Its
// stdout and stderr come back to the agent as frames; a run ends when its Worker says so
// (and then serves the next call, see worker.js) or has exited.

const fs = require('fs');
const net = require('net');
const path = require('path');
const { NextWorker } = require('./arming');
const { Preload } = require('./preload');
const { frame, readFrames } = require('./protocol');

// A run's nonce, which the run's own code cannot guess: read from the kernel's random source,
// opened by path each time (a descriptor held open could be closed and its number taken by a
// file of the function's). Not crypto.randomBytes: loading the crypto module sets OpenSSL up,
// ~0.4 MiB more in every idle node sandbox.
function nonce() {
  const bytes = Buffer.alloc(16);
  const fd = fs.openSync('/dev/urandom', 'r');
  try {
    fs.readSync(fd, bytes, 0, bytes.length, null);
  } finally {
    fs.closeSync(fd);
  }
  return bytes.toString('hex');
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
    this.preload = new Preload();
    this.next = new NextWorker(this.warmupPath, this.preload);
    this.run = null;
  }

  // The input becomes fd 0 of this process: close 0, and open() returns the lowest free fd.
  stageStdin(data) {
    fs.writeFileSync(this.stdinPath, data, { mode: 0o600 });
    fs.closeSync(0);
    const fd = fs.openSync(this.stdinPath, 'r');
    if (fd !== 0) throw new Error(`stdin reopened as fd ${fd}, not 0`);
  }

  // `ps` shows `nanogrid: sandbox node F@V SOCKET` (V: the first 8 hex of the code key) once
  // it serves function F, `nanogrid: sandbox node SOCKET` before (as the fork server's title.py).
  setTitle(request) {
    const fn = (request.env || {}).NANOGRID_FUNCTION_ID;
    const version = request.preload ? `@${request.preload.slice(0, 8)}` : '';
    const title = `nanogrid: sandbox node ${fn ? `${fn}${version} ` : ''}${this.socketPath}`;
    if (process.title !== title) process.title = title;
  }

  start(conn, request, stdin) {
    process.chdir(request.cwd); // process-wide: a Worker cannot chdir, and inherits this
    this.setTitle(request);
    const key = request.preload || null;
    const [armed, waited] = this.next.take(key);
    const { worker } = armed;
    this.stageStdin(stdin);
    resetPeakRss();
    const cap = request.maxOutputBytes;
    const learn = key !== null && this.preload.key === null;
    const run = {
      conn, armed, worker, killed: false, ended: null, exitCode: null, reusable: false,
      nonce: nonce(),
      sent: { stdout: 0, stderr: 0 }, dropped: { stdout: 0, stderr: 0 },
      report: this.preload.report(key, armed.files),
    };
    this.run = run;
    const emit = (name, type, chunk) => {
      const room = Math.max(0, cap - run.sent[name]);
      if (chunk.length > room) run.dropped[name] += chunk.length - room;
      if (room > 0 && chunk.length > 0) { // the agent takes an empty frame for a forged one
        const part = chunk.subarray(0, room);
        run.sent[name] += part.length;
        conn.write(frame(type, part));
      }
    };
    worker.removeAllListeners('error');
    worker.removeAllListeners('exit');
    const argv = [request.argv[0], path.resolve(request.argv[1]), ...request.argv.slice(2)];
    worker.on('message', (message) => {
      if (Array.isArray(message) && message.length === 2 && ArrayBuffer.isView(message[1])) {
        const [tag, bytes] = message; // output, as the Worker's stdout or stderr wrote it
        const chunk = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        if (tag === 'O') emit('stdout', 'O', chunk);
        else if (tag === 'E') emit('stderr', 'E', chunk);
        return;
      }
      if (message === null || typeof message !== 'object' || message.nonce !== run.nonce) return;
      run.ended = message.ended;
      if (learn && message.loaded) this.preload.learn(key, request.env, message.loaded, argv[1]);
      if (message.exitCode === undefined) return; // the Worker is ending: its exit settles
      run.exitCode = message.exitCode;
      run.reusable = message.reusable === true;
      this.settle(conn, run);
    });
    worker.on('error', (error) => {
      // What node prints for an uncaught exception (the Worker's own exit code is 1).
      const text = error && error.stack ? error.stack : `Uncaught ${String(error)}`;
      emit('stderr', 'E', Buffer.from(`${text}\n\nNode.js ${process.version}\n`));
    });
    worker.once('exit', (code) => {
      run.exitCode = code;
      run.reusable = false;
      this.settle(conn, run);
    });
    run.started = waited || process.hrtime.bigint();
    worker.postMessage({ argv, env: request.env, learn, nonce: run.nonce });
  }

  kill() {
    if (this.run === null) return;
    this.run.killed = true;
    this.run.worker.terminate();
  }

  // A run is over once its Worker said so (it serves the next call) or exited.
  settle(conn, run) {
    if (this.run !== run) return;
    this.run = null;
    if (run.reusable && !run.killed) this.next.keep(run.armed);
    else run.worker.terminate(); // an exited Worker: a no-op
    fs.truncateSync(this.stdinPath); // what preloads read between runs is no run's input
    const ended = run.ended === null ? process.hrtime.bigint() : BigInt(run.ended);
    conn.write(frame('X', {
      exitCode: run.exitCode,
      killed: run.killed,
      durationNs: Number(ended - run.started),
      maxrssBytes: peakRss(),
      dropped: run.dropped,
      preload: run.report,
    }));
  }

  serve(conn) {
    let request = null;
    readFrames(conn, (type, body) => {
      if (type === 'R' && this.run === null) {
        request = JSON.parse(body.toString('utf8'));
      } else if (type === 'I' && request !== null) {
        const run = request;
        request = null;
        this.start(conn, run, Buffer.from(body));
      } else if (type === 'D') {
        if (this.run === null) this.next.drop(() => conn.write(frame('W', Buffer.alloc(0))));
      } else if (type === 'K') {
        this.kill();
      } else if (type === 'A') {
        if (this.run === null) {
          this.next.arm();
          this.next.whenSettled(() => conn.write(frame('W', Buffer.alloc(0))));
        }
      } else {
        return false;
      }
      return true;
    });
    conn.on('error', () => {});
    // The agent went away during its run: do not leave the run behind. (A call connects
    // for its run and closes after it; the next call, maybe another worker's, may connect
    // before this close is seen here.)
    conn.on('close', () => {
      if (this.run !== null && this.run.conn === conn) this.kill();
    });
  }

  listen(readyFd, readyLine) {
    this.setTitle({});
    // Both are made while the directory is writable (the Docker runner seals it later).
    fs.writeFileSync(this.stdinPath, '', { mode: 0o600 });
    fs.writeFileSync(this.warmupPath, '', { mode: 0o400 });
    this.next.arm();
    if (fs.existsSync(this.socketPath)) fs.unlinkSync(this.socketPath);
    const server = net.createServer({ allowHalfOpen: false }, (conn) => this.serve(conn));
    server.maxConnections = 4; // the pool lends a sandbox to one call at a time
    server.listen(this.socketPath, () => {
      if (readyFd !== undefined) {
        fs.writeSync(readyFd, readyLine || 'ready\n');
        fs.closeSync(readyFd);
      }
    });
  }
}

module.exports = { Server };
