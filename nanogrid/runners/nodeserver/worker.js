'use strict';
// What runs inside each worker_threads Worker. The server starts every Worker with this
// file's `boot` as eval'd source (WORKER_SOURCE): `boot` uses nothing from this file and
// requires only node's own modules, and the function's `require`s resolve as they would in
// `node main.js`, never to a file of the server.
//
// A Worker serves call after call: each runs its main module from a fresh module registry
// (require.cache emptied), with the globals, `process` listeners and module hooks the Worker
// had before its first call; a call's output travels on the Worker's message port, in order
// with its end. A call that leaves something the Worker cannot take back (an unref'd timer
// or handle, work scheduled in an `exit` listener, an ES module, a global it cannot delete,
// memory that stays resident) ends its Worker, as process.exit(), an uncaught error and a
// timeout do.
//
// A Worker and the server share a little state, read even if the Worker dies:
// [phase (BOOTING, BOOTED, or 2: a preload failed), the index of the file it is requiring,
// what that file did (bits of the server's USES, in preload.js)], and when it began
// requiring. Its phase is how the server waits for it (Atomics.wait).

const [BOOTING, BOOTED] = [0, 1];

// The shared state of one new Worker: `state` (phase, file index, uses) and `began`.
function sharedState() {
  const shared = new SharedArrayBuffer(24);
  const [state, began] = [new Int32Array(shared, 0, 3), new BigInt64Array(shared, 16, 1)];
  state[1] = -1;
  return { state, began };
}

// Runs inside the Worker (its source is eval'd there: it uses nothing from this file): boots,
// requires the files it is given, waits for a call, runs it, reports its end, cleans up and
// waits for the next ('prepare' with files to preload, or the call itself).
// Running an empty module first loads what the module loader needs lazily (half the cost of
// a call on node 18); each call's module is then the main one.
function boot() {
  const { parentPort, workerData } = require('worker_threads');
  const Module = require('module');
  const fs = require('fs');
  const path = require('path');
  const { state, uses: USES } = workerData;
  const post = parentPort.postMessage.bind(parentPort);
  const [ref, unref] = [parentPort.ref.bind(parentPort), parentPort.unref.bind(parentPort)];
  const loadList = process.moduleLoadList;
  const signal = (phase) => {
    Atomics.store(state, 0, phase); // its file reads are over: fd 0 may be swapped now
    Atomics.notify(state, 0);
  };
  // A full GC between calls, so that one call's garbage is not in the next one's peak.
  require('v8').setFlagsFromString('--expose-gc');
  const gc = require('vm').runInNewContext('gc');
  require('v8').setFlagsFromString('--no-expose-gc');
  const collect = () => { // the second GC waits for the first one's buffers to be freed
    gc();
    gc();
  };

  // The call's output: posted on the message port, so that it arrives before the call's end.
  for (const [name, tag] of [['stdout', 'O'], ['stderr', 'E']]) {
    const stream = process[name];
    const send = (chunk, encoding) => post([tag, Buffer.from(chunk, encoding)]);
    stream._write = (chunk, encoding, done) => { send(chunk, encoding); done(); };
    stream._writev = (chunks, done) => {
      for (const { chunk, encoding } of chunks) send(chunk, encoding);
      done();
    };
  }
  // What a call leaves behind that outlives it without keeping it running: an unref'd handle.
  let kept = false;
  const { ChildProcess } = require('child_process');
  const [timeout, immediate] = [setTimeout(() => {}, 0), setImmediate(() => {})];
  clearTimeout(timeout);
  clearImmediate(immediate);
  const unrefs = [Object.getPrototypeOf(timeout), Object.getPrototypeOf(immediate),
    require('net').Socket.prototype,
    require('net').Server.prototype, require('dgram').Socket.prototype, ChildProcess.prototype,
    require('worker_threads').Worker.prototype,
    require('worker_threads').MessagePort.prototype];
  for (const proto of new Set(unrefs)) {
    const original = proto.unref;
    if (typeof original !== 'function') continue;
    Object.defineProperty(proto, 'unref', { configurable: true, writable: true,
      value: function unref(...args) { kept = true; return original.apply(this, args); } });
  }

  const loaded = () => { // the files of the function's directory it loaded, but its main
    const root = fs.realpathSync('.') + path.sep;
    const main = process.mainModule && process.mainModule.filename;
    return Object.keys(require.cache).filter((file) => file.startsWith(root) && file !== main);
  };
  // What a call may change and the next call must not see, as it was before the first one.
  const listened = (emitter) => new Map(emitter.eventNames().map((name) =>
    [name, emitter.rawListeners(name)]));
  const pristine = () => ({
    globals: new Map(Reflect.ownKeys(globalThis).map((key) =>
      [key, Object.getOwnPropertyDescriptor(globalThis, key)])),
    listeners: listened(process),
    port: parentPort.listenerCount('message'),
    extensions: { ...Module._extensions },
    errors: [Error.prepareStackTrace, Error.stackTraceLimit],
  });
  const same = (a, b) => a.value === b.value && a.get === b.get && a.set === b.set;
  // Puts back what `before` holds; false when it cannot (a global the call made fixed).
  const restore = (before) => {
    for (const [key, cached] of Object.entries(require.cache)) {
      delete require.cache[key];
      cached.exports = null; // what node's loader may still hold of a module is no longer its data
      cached.children = [];
    }
    module.children = []; // this script's: what it preloaded
    let clean = true;
    for (const key of Reflect.ownKeys(globalThis)) {
      const was = before.globals.get(key);
      const now = Object.getOwnPropertyDescriptor(globalThis, key);
      if (was === undefined) clean = Reflect.deleteProperty(globalThis, key) && clean;
      else if (!same(was, now)) clean = Reflect.defineProperty(globalThis, key, was) && clean;
    }
    for (const [key, was] of before.globals) {
      if (!Reflect.getOwnPropertyDescriptor(globalThis, key)) {
        clean = Reflect.defineProperty(globalThis, key, was) && clean;
      }
    }
    for (const name of process.eventNames()) {
      const keep = before.listeners.get(name) || [];
      for (const listener of process.rawListeners(name)) {
        if (!keep.includes(listener)) process.removeListener(name, listener);
      }
    }
    for (const key of Object.keys(Module._extensions)) {
      if (!(key in before.extensions)) delete Module._extensions[key];
    }
    Object.assign(Module._extensions, before.extensions);
    [Error.prepareStackTrace, Error.stackTraceLimit] = before.errors;
    process.exitCode = undefined;
    process.mainModule = undefined; // it holds the call's modules (its children)
    for (const key of Object.keys(process.env)) delete process.env[key];
    return clean && parentPort.listenerCount('message') === before.port;
  };

  let job = null;
  let before = null;
  let stdin = null;
  // Memory when this Worker was last ready for a call: a call whose memory stayed resident
  // after its end (in node's heap or in malloc's free lists, which a Worker that goes on keeps)
  // would be in the next call's peak, so its Worker ends instead.
  const SLACK = 4 * 2 ** 20;
  const ready = { used: 0, rss: 0, first: 0, base: 0, files: 0 };
  const used = () => {
    const { heapUsed, external } = process.memoryUsage();
    return heapUsed + external;
  };
  // `files`: how many files it preloaded; its first time ready with as many is its yardstick.
  const settle = (files = ready.files) => {
    Object.assign(ready, { used: used(), rss: process.memoryUsage.rss() });
    if (ready.base === 0) ready.base = ready.used;
    if (ready.first === 0 || files !== ready.files) Object.assign(ready, { first: ready.rss, files });
  };
  const run = (next) => {
    job = next;
    kept = false;
    for (const key of Object.keys(process.env)) delete process.env[key];
    Object.assign(process.env, job.env);
    process.argv = [process.execPath, ...job.argv.slice(1)];
    stdin = null; // fd 0 holds the input; a Worker's own stdin would be a message port
    Object.defineProperty(process, 'stdin', { configurable: true, enumerable: true, get: () =>
      stdin || (stdin = fs.createReadStream(null, { fd: 0, autoClose: false })) });
    process.on('exit', exited);
    unref();
    Module.runMain(process.argv[1]);
  };
  // process.exit() or an uncaught error: the Worker ends with the call.
  const exited = () => post({ nonce: job.nonce, ended: process.hrtime.bigint(),
    loaded: job.learn ? loaded() : null });
  // The call's event loop is empty (after the function's own beforeExit listeners ran): it
  // has ended as `node main.js` would exit.
  const drained = () => {
    if (job === null || process.getActiveResourcesInfo().length > 0) return;
    const ended = process.hrtime.bigint();
    process.off('exit', exited);
    const ours = before.listeners.get('exit') || []; // node's own: they end the Worker's stdio
    for (const listener of process.rawListeners('exit')) {
      if (!ours.includes(listener)) listener.call(process, process.exitCode || 0);
    }
    const exitCode = process.exitCode || 0;
    const files = job.learn ? loaded() : null;
    const main = require.cache[process.argv[1]] !== undefined; // an ES module is not in it
    const scheduled = process.getActiveResourcesInfo().length > 0;
    if (stdin !== null) stdin.destroy();
    const clean = restore(before);
    let reusable = clean && main && !kept && !scheduled &&
      !loadList.includes('NativeModule internal/modules/esm/module_job');
    if (reusable && used() > ready.used + SLACK) collect(); // its garbage, before the peak is read
    const rss = process.memoryUsage.rss();
    reusable &&= rss <= ready.rss + SLACK && rss <= ready.first + 2 * SLACK;
    const { nonce } = job;
    job = null;
    post({ nonce, ended, loaded: files, exitCode, reusable });
    if (!reusable) process.exit(exitCode); // what it left ends with its Worker
    ref();
    if (used() > ready.base + SLACK) collect(); // its preloads' garbage, after the reply
    settle();
  };
  process.on('beforeExit', () => queueMicrotask(drained));

  // Requires each file with what belongs to the call (its environment, stdio and stdin,
  // timers) replaced by stand-ins that note their use; stops at the first file that used any.
  const preload = async ({ files, env, main }) => {
    let uses = 0;
    let watching = true;
    const use = (name) => { // a bit per name, as the server's USES: read even if the Worker dies
      if (watching) Atomics.store(state, 2, (uses |= 1 << USES.indexOf(name)));
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
    const own = (key) => typeof key !== 'string' || env.includes(key);
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
    process.argv = [process.execPath, main];
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
  // Readies this Worker for the next call: requires `job.files` (none: it is ready at once).
  const prepare = (next) => {
    if (next.files.length === 0) return signal(1);
    const failed = () => signal(2); // also when a file ends the Worker
    process.on('exit', failed);
    preload(next).then((uses) => {
      if (uses !== 0) return process.exit(); // what it loaded must stay out of every call
      process.off('exit', failed);
      settle(next.files.length);
      signal(1);
    });
  };
  parentPort.on('message', (message) => (message.files ? prepare(message) : run(message)));
  Module.runMain(workerData.warmup);
  delete require.cache[workerData.warmup];
  before = pristine();
  settle();
  prepare(workerData);
}
const WORKER_SOURCE = `'use strict';\n(${boot})();\n`;

module.exports = { BOOTING, BOOTED, WORKER_SOURCE, sharedState };
