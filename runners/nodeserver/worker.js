'use strict';
// What runs inside each worker_threads Worker. The server starts every Worker with this
// file's `boot` as eval'd source (WORKER_SOURCE): `boot` uses nothing from this file and
// requires only node's own modules, and the function's `require`s resolve as they would in
// `node main.js`, never to a file of the server.
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
const WORKER_SOURCE = `'use strict';\n(${boot})();\n`;

module.exports = { BOOTING, BOOTED, WORKER_SOURCE, sharedState };
