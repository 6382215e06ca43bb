'use strict';
// The idle process inside every node sandbox: runs a function on request in a worker thread
// it started before the request came. Stdlib only and self-contained (node >= 18): it is
// bind-mounted into containers and started there as `node nodeserver.js SOCKET`, or started
// on the host by the process runner (after runners/forkserver/sandbox.py's setup, which
// passes `{"ready_fd": n, "ready_line": ...}`: the line to write there once it serves).
//
// Node cannot fork and cannot receive file descriptors, so instead of the python fork
// server's fork-per-call, a `worker_threads` Worker is started (~25 ms) between runs, off
// the next call's path, and waits; a call hands it the function, and its stdio travels
// through this server. `process.exit(n)` in a Worker ends only that Worker, with code n; a
// timeout is `worker.terminate()`. A Worker's fd 0 is the process's: before each run the
// input is written to CONTROL/stdin (emptied after it) and reopened as fd 0, so
// `fs.readFileSync(0)`, `/dev/stdin` and the Worker's `process.stdin` all read the input.
//
// Import-warm ("preload": the agent's code_key, or null): the first run of a key names the
// files it loaded from its own directory (require.cache but its main script); from then on
// every Worker requires them while it waits, so a call runs its main script with them loaded,
// still in a Worker of its own (module state is never shared between calls). A file whose
// require throws, writes to stdout or stderr, reads the call's environment or stdin, starts
// a timer, leaves a handle open or ends its Worker, or that does not load within
// PRELOAD_BUDGET_MS (with those before it), is left out for good: its Worker is discarded and
// every call requires it itself, as without preloading.
//
// Protocol on an AF_UNIX stream socket, one client at a time, one run at a time; frames of
// a type byte, a big-endian uint32 length and a payload:
//
//   -> 'R' {"argv": [...], "cwd": ..., "env": {...}, "maxOutputBytes": n, "preload": key},
//      then 'I' stdin
//   <- 'O' stdout bytes, 'E' stderr bytes (each at most maxOutputBytes in all)
//   -> 'K' (optional: kill, e.g. on timeout)
//   <- 'X' {"exitCode": n, "killed": bool, "durationNs": n, "maxrssBytes": n,
//          "dropped": {"stdout": n, "stderr": n},
//          "preload": {"preloaded": [file, ...], "left_out": {file: why}} (when it changed)}
//   -> 'A' (the run's peak is read: start the next Worker now, so that neither its start
//          nor its preloading is in a run's peak; without it, the next run starts one)
//
// argv is [interpreter, script, ...args]: the script runs as `node script args` would
// (require.main, process.argv, exit codes, uncaught errors on stderr with exit code 1).

const fs = require('fs');
const net = require('net');
const path = require('path');
const { Worker } = require('worker_threads');

const HEADER = 5;
const MAX_FRAME = 64 * 1024 * 1024;
const BOOT_WAIT_MS = 5000;
const PRELOAD_BUDGET_MS = 2000;
// A Worker's shared state: [phase (BOOTING, BOOTED, or 2: a preload failed), the index of the
// file it is requiring, what that file did (bits of USES)], and when it began requiring.
const [BOOTING, BOOTED] = [0, 1];
const USES = {
  threw: 'its require threw', output: 'it writes to stdout or stderr',
  env: "it reads the call's environment", stdin: 'it reads stdin',
  timer: 'it starts a timer', handle: 'it leaves a handle open',
};

// Runs inside the Worker (its source is eval'd there: it uses nothing from this file): boots,
// requires the files it is given, waits for the run, becomes the function, reports its end.
// Running an empty module first loads what the module loader needs lazily (half the cost of
// a call on node 18); the function's own module is then the main one.
function boot() {
  const { parentPort, workerData } = require('worker_threads');
  const Module = require('module');
  const fs = require('fs');
  const { state, files } = workerData;
  const signal = (phase) => {
    Atomics.store(state, 0, phase); // its file reads are over: fd 0 may be swapped now
    Atomics.notify(state, 0);
  };
  const loaded = () => { // the files of the function's directory it loaded, but its main
    const root = fs.realpathSync('.') + require('path').sep;
    const main = process.mainModule && process.mainModule.filename;
    return Object.keys(require.cache).filter((file) => file.startsWith(root) && file !== main);
  };
  const run = (job) => {
    for (const key of Object.keys(process.env)) delete process.env[key];
    Object.assign(process.env, job.env);
    process.argv = [process.execPath, ...job.argv.slice(1)];
    let stdin = null; // fd 0 holds the input; a Worker's own stdin would be a message port
    Object.defineProperty(process, 'stdin', { configurable: true, enumerable: true, get: () =>
      stdin || (stdin = fs.createReadStream(null, { fd: 0, autoClose: false })) });
    process.on('exit', () => parentPort.postMessage({
      ended: process.hrtime.bigint(), loaded: job.learn ? loaded() : null,
    }));
    parentPort.unref();
    Module.runMain(process.argv[1]);
  };
  const serve = () => {
    signal(1);
    parentPort.once('message', run);
  };
  // Requires each file with what belongs to the call (its environment, stdio and stdin,
  // timers) replaced by stand-ins that note their use; stops at the first file that used any.
  const preload = async () => {
    let uses = 0;
    let watching = true;
    const use = (name) => { // a bit per name, as the server's USES: read even if the Worker dies
      if (watching) Atomics.store(state, 2, (uses |= 1 << workerData.uses.indexOf(name)));
      return true;
    };
    const undo = [];
    const swap = (object, key, descriptor) => {
      const own = Object.getOwnPropertyDescriptor(object, key);
      Object.defineProperty(object, key, { configurable: true, ...descriptor });
      undo.push(() => (own ? Object.defineProperty(object, key, own) : delete object[key]));
    };
    const refuse = (object, key, name, when = () => true) => {
      const original = object[key];
      swap(object, key, { writable: true, value: function (...args) {
        if (!when(args[0])) return original.apply(this, args);
        use(name);
        throw new Error('not while preloading');
      } });
    };
    // A name the call's environment lacks reads the same (undefined) here: only its own
    // names, listing them and changes are the call's.
    const own = (key) => typeof key !== 'string' || workerData.env.includes(key);
    const traps = Object.fromEntries(['get', 'has', 'getOwnPropertyDescriptor', 'set', 'ownKeys',
      'deleteProperty', 'defineProperty'].map((name, i) => [name, (...args) =>
      ((i > 2 || own(args[1])) && use('env'), Reflect[name](...args))]));
    swap(process, 'env', { writable: true, value: new Proxy(process.env, traps) });
    swap(process, 'stdin', { get: () => use('stdin') && undefined });
    for (const stream of [process.stdout, process.stderr]) refuse(stream, 'write', 'output');
    const stdinNames = [0, '/dev/stdin', '/proc/self/fd/0'];
    const reads = ['readFileSync', 'readSync', 'openSync', 'createReadStream', 'readFile', 'read',
      'open'];
    for (const key of reads) refuse(fs, key, 'stdin', (target) => stdinNames.includes(target));
    const immediate = setImmediate;
    for (const key of ['setTimeout', 'setInterval', 'setImmediate']) refuse(global, key, 'timer');
    process.argv = [process.execPath, workerData.main];
    Atomics.store(workerData.began, 0, process.hrtime.bigint());
    try {
      for (let i = 0; i < files.length && !uses; i++) {
        Atomics.store(state, 1, i);
        const handles = process.getActiveResourcesInfo().join();
        try {
          require(files[i]);
        } catch {
          if (!uses) use('threw'); // not when it is what a stand-in threw
        }
        await new Promise((resolve) => immediate(resolve)); // its ticks and promises run here
        if (process.getActiveResourcesInfo().join() !== handles) use('handle');
      }
      return uses;
    } finally {
      watching = false;
      for (const restore of undo.reverse()) restore();
    }
  };
  Module.runMain(workerData.warmup);
  if (files.length === 0) return serve();
  const failed = () => signal(2); // also when a file ends the Worker
  process.on('exit', failed);
  preload().then((uses) => {
    if (uses !== 0) return process.exit(); // what it loaded must stay out of every call
    process.off('exit', failed);
    serve();
  });
}
const BOOT = `'use strict';\n(${boot})();\n`;

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

// What this sandbox's Workers preload: the files the first run of its key loaded, less those
// a Worker left out. `env`: the names of that run's environment (every call's, by contract).
class Preload {
  constructor() {
    Object.assign(this, { key: null, env: [], files: [], main: '', leftOut: {}, reported: '' });
  }

  learn(key, env, files, main) {
    Object.assign(this, { key, env: Object.keys(env), files, main });
  }

  // Leaves out what made `armed` fail, if anything did; true when it left a file out.
  judge(armed) {
    const [phase, index, uses] = Array.from(armed.state, (_, i) => Atomics.load(armed.state, i));
    if (phase === BOOTED || index < 0) return false; // booted, or died before preloading
    let why = 'it ended its Worker (process.exit or an uncaught error)';
    if (uses !== 0) {
      why = Object.values(USES).filter((_, bit) => uses & (1 << bit)).join(', ');
    } else if (armed.overBudget) {
      why = `the preloads took longer than ${PRELOAD_BUDGET_MS} ms`;
      for (const file of armed.files.slice(index + 1)) this.leftOut[name(file)] = 'not tried';
    }
    this.leftOut[name(armed.files[index])] = why;
    this.files = this.files.filter((file) => !(name(file) in this.leftOut));
    return true;
  }

  // What a run of `key` in a Worker that preloaded `files` tells the agent, if it is news.
  report(key, files) {
    if (key === null || key !== this.key) return undefined;
    const report = { preloaded: files.map(name), left_out: this.leftOut };
    const text = JSON.stringify(report);
    if (text === this.reported) return undefined;
    this.reported = text;
    return report;
  }
}

function name(file) { // as the function's directory (this process's cwd) names it
  return path.relative(process.cwd(), file);
}

class Server {
  constructor(socketPath) {
    this.socketPath = socketPath;
    this.stdinPath = path.join(path.dirname(socketPath), 'stdin');
    this.warmupPath = path.join(path.dirname(socketPath), 'warmup.js');
    this.preload = new Preload();
    this.armed = null;
    this.run = null;
  }

  // A new Worker that boots and requires `files`; past its budget it is ended.
  arm(files = this.preload.files) {
    const shared = new SharedArrayBuffer(24);
    const [state, began] = [new Int32Array(shared, 0, 3), new BigInt64Array(shared, 16, 1)];
    state[1] = -1;
    const { key, env, main } = this.preload;
    const uses = Object.keys(USES);
    const workerData = { warmup: this.warmupPath, state, began, files, env, main, uses };
    const options = { eval: true, stdout: true, stderr: true, env: {}, workerData };
    const worker = new Worker(BOOT, options);
    const deadline = Date.now() + PRELOAD_BUDGET_MS;
    const armed = { worker, state, began, files, key, deadline, overBudget: false };
    worker.on('error', () => {}); // before a run: noticed by its exit; in a run: see start()
    worker.once('exit', () => {
      if (this.armed !== armed) return;
      this.armed = null; // died waiting: re-armed without what killed it, or on demand
      if (this.preload.judge(armed)) this.armed = this.arm();
    });
    if (files.length > 0) {
      setTimeout(() => {
        if (this.armed !== armed || Atomics.load(state, 0) !== BOOTING) return;
        armed.overBudget = true;
        worker.terminate();
      }, PRELOAD_BUDGET_MS).unref();
    }
    return armed;
  }

  // The armed Worker once it booted (one without preloads if it preloaded another key or
  // failed), and since when the call waited for preloads (null: it did not): that wait is in
  // the run's time, as the call would have required those files itself; a Worker's plain
  // start is not.
  take(key) {
    const arrived = process.hrtime.bigint();
    const armed = this.armed || this.arm();
    this.armed = null;
    if (armed.files.length === 0) {
      // A Worker still booting opens files on its own thread: one could take fd 0 between
      // stageStdin's close and open. Wait (at most BOOT_WAIT_MS) until it has booted.
      Atomics.wait(armed.state, 0, BOOTING, BOOT_WAIT_MS);
      return [armed, null];
    }
    let waited = null;
    if (armed.key === key) { // wait until its preloads are over, at most until its budget is
      Atomics.wait(armed.state, 0, BOOTING, Math.max(0, armed.deadline - Date.now()));
      const [phase, began] = [Atomics.load(armed.state, 0), Atomics.load(armed.began, 0)];
      waited = began > arrived ? began : arrived;
      if (phase === BOOTED) return [armed, waited];
      armed.overBudget = phase === BOOTING;
      this.preload.judge(armed);
    }
    armed.worker.terminate();
    this.armed = this.arm([]);
    return [this.take(key)[0], waited];
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
    const key = request.preload || null;
    const [armed, waited] = this.take(key);
    const { worker } = armed;
    this.stageStdin(stdin);
    resetPeakRss();
    const cap = request.maxOutputBytes;
    const learn = key !== null && this.preload.key === null;
    const run = {
      worker, killed: false, ended: null, exitCode: null, pending: 3,
      sent: { stdout: 0, stderr: 0 }, dropped: { stdout: 0, stderr: 0 },
      report: this.preload.report(key, armed.files),
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
    const argv = [request.argv[0], path.resolve(request.argv[1]), ...request.argv.slice(2)];
    worker.on('message', ({ ended, loaded }) => {
      run.ended = ended;
      if (learn && loaded) this.preload.learn(key, request.env, loaded, argv[1]);
    });
    worker.on('error', (error) => {
      // What node prints for an uncaught exception (the Worker's own exit code is 1).
      const text = error && error.stack ? error.stack : `Uncaught ${String(error)}`;
      emit('stderr', 'E', Buffer.from(`${text}\n\nNode.js ${process.version}\n`));
    });
    worker.once('exit', (code) => {
      run.exitCode = code;
      this.settle(conn, run);
    });
    run.started = waited || process.hrtime.bigint();
    worker.postMessage({ argv, env: request.env, learn });
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
        } else if (type === 'A') {
          if (this.run === null && this.armed === null) this.armed = this.arm();
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
    this.armed = this.arm();
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
