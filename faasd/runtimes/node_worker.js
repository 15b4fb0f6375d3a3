'use strict';
/**
 * The Node.js runtime shim: one worker process serving one function.
 *
 * Started by the daemon as `node node_worker.js`, with the control socket
 * inherited (its descriptor number in `_FAASD_CONTROL_FD`; see
 * faasd/protocol.py for the framing) and the function's environment
 * (`_HANDLER`, `LAMBDA_TASK_ROOT`, ...). It loads the handler once (CommonJS
 * or ES module, found as AWS's Node runtime finds it), says READY, then serves
 * INVOKE frames one at a time until SHUTDOWN or end of file.
 *
 * The programming model is Lambda's: async handlers, handlers that return a
 * promise, and callback handlers (`callback`, `context.succeed/fail/done`),
 * where `context.callbackWaitsForEmptyEventLoop` (default true) holds the
 * response until the event loop is empty. For that, the control socket is
 * unreferenced while a handler runs, so Node's 'beforeExit' fires when only
 * the handler's own work could have kept the loop alive. Streaming handlers
 * (`awslambda.streamifyResponse`) send what they write as CHUNK frames, as they
 * write it (the daemon passes each on to a caller that streams), with the
 * control socket's backpressure as their stream's.
 *
 * console.* writes Lambda's `time\trequestId\tLEVEL\tmessage` records as LOG
 * frames, one line each (a message's newlines become \r, as on Lambda), or
 * with AWS_LAMBDA_LOG_FORMAT=JSON one JSON object each; errors, init errors
 * and their types follow AWS's Node runtime.
 *
 * Node's standard library only: the function's own code decides what else is loaded.
 */

const T0 = process.hrtime.bigint();

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const path = require('path');
const { Writable } = require('stream');
const util = require('util');
const { pathToFileURL } = require('url');

// Frame kinds and layout: faasd/protocol.py.
const INVOKE = 1;
const SHUTDOWN = 2;
const READY = 10;
const INIT_ERROR = 11;
const LOG = 12;
const RESULT = 13;
const ERROR = 14;
const CHUNK = 16;
const HEADER_SIZE = 5; // uint32 big-endian payload length, then one kind byte

// Lambda's "6 MB" response limit: faasd/protocol.py's MAX_RESPONSE_BYTES, which the daemon checks too.
// A streamed response is the daemon's to count: its limit depends on whether the caller streams.
const MAX_RESPONSE_BYTES = 6291556;
const CHUNK_BYTES = 64 * 1024; // the most of a streamed response in one CHUNK frame

const controlFd = Number(process.env._FAASD_CONTROL_FD || 3);
delete process.env._FAASD_CONTROL_FD;
const parentPid = process.env._FAASD_PARENT_PID;
delete process.env._FAASD_PARENT_PID;
if (parentPid && process.ppid !== Number(parentPid)) {
  process.exit(1); // the daemon died before this process could be tied to it
}

const control = new net.Socket({ fd: controlFd, readable: true, writable: true });
// The daemon closed its end or went away: nothing left to serve.
control.on('error', () => process.exit(1));
control.on('close', () => process.exit(0));

/** Write one frame; `done` runs once it (and every frame before it) is handed to the kernel. */
function send(kind, payload, done) {
  const body = typeof payload === 'string' ? Buffer.from(payload, 'utf8') : payload || Buffer.alloc(0);
  const head = Buffer.allocUnsafe(HEADER_SIZE);
  head.writeUInt32BE(body.length, 0);
  head.writeUInt8(kind, 4);
  // One write per frame, so frames never interleave; libuv tries it at once,
  // so a line logged just before the worker is killed still reaches the daemon.
  control.write(Buffer.concat([head, body]), done);
}

// -- incoming frames ------------------------------------------------------------

let chunks = [];
let pending = 0;

control.on('data', (chunk) => {
  chunks.push(chunk);
  pending += chunk.length;
  while (pending >= HEADER_SIZE) {
    if (chunks[0].length < HEADER_SIZE) {
      chunks = [Buffer.concat(chunks, pending)];
    }
    const total = HEADER_SIZE + chunks[0].readUInt32BE(0);
    if (pending < total) {
      return;
    }
    const all = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, pending);
    const rest = all.subarray(total);
    chunks = rest.length ? [rest] : [];
    pending = rest.length;
    onFrame(all[4], all.subarray(HEADER_SIZE, total));
  }
});

function onFrame(kind, payload) {
  if (kind === INVOKE) {
    invoke(payload);
  } else if (kind === SHUTDOWN) {
    process.exit(0);
  }
}

// -- console: Lambda's log lines, as LOG frames -----------------------------------

// The invocation's request id, where AWS's runtime keeps it (LogPatch.js) and libraries
// look for it: a global under this symbol. Printed as "undefined" before the first
// invocation, as on Lambda.
const REQUEST_ID = Symbol.for('aws.lambda.runtime.requestId');
let jsonLogs = false; // AWS_LAMBDA_LOG_FORMAT=JSON: Lambda's LoggingConfig LogFormat

const LEVELS = { TRACE: 1, DEBUG: 2, INFO: 3, WARN: 4, ERROR: 5, FATAL: 6 };

function textRecord(level, [message, ...params]) {
  // As AWS's runtime formats it: util.format(message, ...params), so console.log() is "undefined".
  const text = util.format(message, ...params).replace(/\n/g, '\r');
  return `${new Date().toISOString()}\t${globalThis[REQUEST_ID]}\t${level}\t${text}`;
}

function errorFields(error) {
  return {
    errorType: error?.constructor?.name ?? 'UnknownError',
    errorMessage: error.message,
    stackTrace: typeof error.stack === 'string' ? userStack(error.stack) : [],
  };
}

function jsonReplacer(_key, value) {
  return value instanceof Error ? Object.assign(errorFields(value), value) : value;
}

/** {timestamp, level, requestId, message}: a lone argument is the message as it is, an
 * Error's fields included; more are formatted, with the first Error's fields beside. */
function jsonRecord(level, args) {
  const record = { timestamp: new Date().toISOString(), level, requestId: globalThis[REQUEST_ID] };
  if (args.length <= 1) { // console.log() alone: no message at all, as AWS's runtime writes it
    record.message = args[0];
    try {
      return JSON.stringify(record, jsonReplacer);
    } catch (_) {
      record.message = util.format(args[0]);
      return JSON.stringify(record);
    }
  }
  record.message = util.format(...args);
  const error = args.find((arg) => arg instanceof Error);
  return JSON.stringify(error ? Object.assign(record, errorFields(error)) : record);
}

function patchConsole() {
  const threshold = LEVELS[(process.env.AWS_LAMBDA_LOG_LEVEL || '').toUpperCase()] || LEVELS.TRACE;
  jsonLogs = (process.env.AWS_LAMBDA_LOG_FORMAT || '').toUpperCase() === 'JSON';
  const record = jsonLogs ? jsonRecord : textRecord;
  const logger = (level) => {
    if (LEVELS[level] < threshold) {
      return () => {};
    }
    return (...args) => send(LOG, `${record(level, args)}\n`);
  };
  console.trace = logger('TRACE');
  console.debug = logger('DEBUG');
  console.info = logger('INFO');
  console.log = console.info;
  console.warn = logger('WARN');
  console.error = logger('ERROR');
  console.fatal = logger('FATAL');
}

// process.stdout and process.stderr: what code writes to them directly (a library's
// progress output, say) goes out as LOG frames too, in order with the call's result.
// Written to the pipe behind them, a large chunk could reach the daemon after the
// result, and be logged after END as no call's. What children print still takes the pipe.
let linePending = false; // the last direct write did not end its line

function patchStreams() {
  for (const stream of [process.stdout, process.stderr]) {
    stream.write = (chunk, encoding, callback) => {
      if (typeof encoding === 'function') {
        callback = encoding;
        encoding = undefined;
      }
      const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString(encoding || 'utf8');
      if (text) {
        send(LOG, text);
        linePending = !text.endsWith('\n');
      }
      if (typeof callback === 'function') {
        process.nextTick(callback);
      }
      return true;
    };
  }
}

/** A line a direct write left open is a line of what ends (a call, the init). */
function endLine() {
  if (linePending) {
    linePending = false;
    send(LOG, '\n');
  }
}

// -- errors in Lambda's Node shapes -------------------------------------------------

function runtimeError(type, message, stack) {
  const error = new Error(message);
  error.name = type;
  if (stack !== undefined) {
    error.stack = stack;
  }
  return error;
}

function isErrorLike(value) {
  return Boolean(value) && typeof value.name === 'string' && typeof value.message === 'string' &&
    typeof value.stack === 'string';
}

/** The shim's own frames are not the user's business: drop them, as Python's shim does. */
function userStack(stack) {
  return String(stack).split('\n').filter((line) => !line.includes(__filename));
}

/** {errorType, errorMessage, trace}: what the caller gets, as AWS's Node runtime builds it. */
function describe(error) {
  try {
    if (util.types.isNativeError(error) || isErrorLike(error)) {
      return { errorType: error.name, errorMessage: error.message, trace: userStack(error.stack) };
    }
    return { errorType: typeof error, errorMessage: String(error), trace: [] };
  } catch (_) {
    return {
      errorType: 'handled',
      errorMessage: 'callback called with Error argument, but there was a problem while retrieving ' +
        'one or more of its message, name, and stack',
    };
  }
}

/** The error as Lambda logs it: a tab, then JSON with its enumerable properties too. */
function formatted(error) {
  const replacer = (_key, value) => {
    if (value instanceof Error) {
      const out = Object.assign({ errorType: value.name, errorMessage: value.message, code: value.code }, value);
      if (typeof value.stack === 'string') {
        out.stack = userStack(value.stack);
      }
      return out;
    }
    return value;
  };
  try {
    return '\t' + JSON.stringify(error instanceof Error ? error : new Error(String(error)), replacer);
  } catch (_) {
    return '\t' + JSON.stringify(describe(error));
  }
}

/** Log an error the runtime caught; in JSON logs the error itself is the message, as on Lambda. */
function logError(label, error) {
  if (jsonLogs) {
    console.error(error instanceof Error ? error : new Error(error));
  } else {
    console.error(label, formatted(error));
  }
}

// -- response streaming: Lambda's `awslambda` global ----------------------------------

const HANDLER_STREAMING = Symbol.for('aws.lambda.runtime.handler.streaming');
const STREAM_RESPONSE = 'response';
const HTTP_INTEGRATION_RESPONSE = 'application/vnd.awslambda.http-integration-response';

/** The `responseStream` of a streaming handler. As AWS's runtime writes each chunk to its
 * HTTP request to the Runtime API at once, this sends each as CHUNK frames at once, in order
 * with the call's log lines and before its RESULT or ERROR: a handler that throws after it
 * wrote has its chunks delivered, then its error. write() answers false, and 'drain'
 * follows, while the control socket has more queued than it wants: the daemon reads no
 * further while the caller has not taken what came, so a pipeline waits for a slow caller. */
class ResponseStream extends Writable {
  constructor(call) {
    super();
    this.call = call;
    this.started = false;
    this.waitingForDrain = false;
    this._onBeforeFirstWrite = undefined; // set by HttpResponseStream.from, as on Lambda
  }

  setContentType(_contentType) {
    if (this.started) {
      throw runtimeError('Runtime.InvalidStreamingOperation', 'Cannot set content-type, too late.');
    }
  }

  start() {
    if (!this.started) {
      this.started = true;
      if (typeof this._onBeforeFirstWrite === 'function') {
        this._onBeforeFirstWrite((data) => this.sendChunk(data));
      }
    }
  }

  write(chunk, encoding, callback) {
    if (typeof encoding === 'function') {
      [encoding, callback] = [undefined, encoding];
    }
    if (typeof chunk !== 'string' && !Buffer.isBuffer(chunk) && chunk?.constructor !== Uint8Array) {
      chunk = JSON.stringify(chunk);
    }
    if (this.writableEnded) {
      return super.write(chunk, encoding, callback); // Node's own error: write after end
    }
    this.start();
    this.sendChunk(typeof chunk === 'string' ? Buffer.from(chunk, encoding || 'utf8') : chunk, callback);
    if (!control.writableNeedDrain) {
      return true;
    }
    if (!this.waitingForDrain) {
      this.waitingForDrain = true;
      control.once('drain', () => {
        this.waitingForDrain = false;
        this.emit('drain');
      });
    }
    return false;
  }

  /** Send `data` on as CHUNK frames; `callback` once the last is handed to the kernel. What a
   * handler writes after its call has ended (a stray timer) is dropped: it is no call's. */
  sendChunk(data, callback) {
    const done = typeof callback === 'function' ? () => callback() : undefined;
    if (this.call.finished) {
      if (done) {
        process.nextTick(done);
      }
      return;
    }
    let bytes = data;
    if (typeof data === 'string') {
      bytes = Buffer.from(data, 'utf8');
    } else if (!Buffer.isBuffer(data)) {
      bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength); // a Uint8Array
    }
    if (bytes.length === 0) {
      if (done) {
        process.nextTick(done);
      }
      return;
    }
    for (let start = 0; start < bytes.length; start += CHUNK_BYTES) {
      const last = start + CHUNK_BYTES >= bytes.length;
      send(CHUNK, bytes.subarray(start, start + CHUNK_BYTES), last ? done : undefined);
    }
  }

  end(chunk, encoding, callback) {
    if (typeof chunk === 'function') {
      [chunk, callback] = [undefined, chunk];
    } else if (typeof encoding === 'function') {
      [encoding, callback] = [undefined, encoding];
    }
    if (chunk !== undefined && chunk !== null) {
      this.write(chunk, encoding);
    }
    this.start(); // the metadata of a response with no body
    return super.end(callback);
  }

  _write(chunk, _encoding, callback) {
    callback(); // only a write after end() gets here: write() sends everything else itself
  }
}

/** awslambda.HttpResponseStream: a function URL's status, headers and cookies, as a JSON
 * prelude and eight NUL bytes before the body (Lambda's http-integration-response). */
class HttpResponseStream {
  static from(underlyingStream, prelude) {
    underlyingStream.setContentType(HTTP_INTEGRATION_RESPONSE);
    const metadata = JSON.stringify(prelude);
    underlyingStream._onBeforeFirstWrite = (write) => {
      write(metadata);
      write(new Uint8Array(8));
    };
    return underlyingStream;
  }
}

function installAwsLambdaGlobal() {
  const optOut = process.env.AWS_LAMBDA_NODEJS_NO_GLOBAL_AWSLAMBDA;
  if (optOut === '1' || optOut === 'true') {
    return;
  }
  globalThis.awslambda = {
    streamifyResponse: (streamingHandler) => {
      streamingHandler[HANDLER_STREAMING] = STREAM_RESPONSE;
      return streamingHandler;
    },
    HttpResponseStream,
  };
}

// -- loading the handler, as AWS's Node runtime does ----------------------------------

function packageTypeIsModule(folder) {
  // The nearest package.json decides whether .js files are ES modules.
  for (let dir = folder; ; dir = path.dirname(dir)) {
    if (dir.endsWith(`${path.sep}node_modules`)) {
      return false;
    }
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest)) {
      try {
        return JSON.parse(fs.readFileSync(manifest, 'utf8')).type === 'module';
      } catch (error) {
        console.warn(`${manifest} cannot be read, it will be ignored for ES module detection purposes.`, error);
        return false;
      }
    }
    if (dir === path.dirname(dir)) {
      return false;
    }
  }
}

async function loadModule(root, moduleRoot, name) {
  const file = path.resolve(root, moduleRoot, name);
  const exists = (candidate) => fs.existsSync(candidate);
  if (exists(file)) {
    return require(file);
  }
  const esm = packageTypeIsModule(path.dirname(file));
  if (exists(`${file}.js`)) {
    return esm ? import(pathToFileURL(`${file}.js`).href) : require(`${file}.js`);
  }
  if (exists(`${file}.mjs`)) {
    return import(pathToFileURL(`${file}.mjs`).href);
  }
  if (exists(`${file}.cjs`)) {
    return require(`${file}.cjs`);
  }
  // Node's own resolution, from the task root (a package in node_modules).
  return require(require.resolve(name, { paths: [root, path.resolve(root, moduleRoot)] }));
}

async function loadHandler() {
  const fullHandler = process.env._HANDLER || '';
  const root = process.env.LAMBDA_TASK_ROOT || process.cwd();
  if (fullHandler.includes('..')) {
    throw runtimeError('Runtime.MalformedHandlerName',
      `'${fullHandler}' is not a valid handler name. Use absolute paths when specifying root directories in handler names.`);
  }
  const base = path.basename(fullHandler);
  const moduleRoot = fullHandler.substring(0, fullHandler.indexOf(base));
  const match = base.match(/^([^.]*)\.(.*)$/);
  if (!match) {
    throw runtimeError('Runtime.MalformedHandlerName', 'Bad handler');
  }
  const [, moduleName, handlerPath] = match;
  installAwsLambdaGlobal();
  let app;
  try {
    app = await loadModule(root, moduleRoot, moduleName);
  } catch (error) {
    if (error instanceof SyntaxError) {
      throw runtimeError('Runtime.UserCodeSyntaxError', String(error), error.stack);
    }
    // As AWS's runtime: require()'s MODULE_NOT_FOUND is an ImportModuleError whose message is
    // Node's whole error, require stack included (the shim closes it where Lambda's names
    // /var/runtime/index.mjs); an ES module's import of a missing package
    // (ERR_MODULE_NOT_FOUND) is not caught, and reaches the caller as it is.
    if (error && error.code === 'MODULE_NOT_FOUND') {
      let message = String(error);
      try {
        fs.readdirSync(root);
      } catch (unreadable) {
        // Node, like Python, reports code it may not read as code that is not there.
        message += ` (this worker runs as uid ${process.getuid()}, which cannot read ${root}: ` +
          `${unreadable.message}; every directory above the code must be searchable by that user)`;
      }
      throw runtimeError('Runtime.ImportModuleError', message);
    }
    throw error;
  }
  const handler = handlerPath.split('.').reduce((object, key) => object && object[key], app);
  if (!handler) {
    throw runtimeError('Runtime.HandlerNotFound', `${fullHandler} is undefined or not exported`);
  }
  if (typeof handler !== 'function') {
    throw runtimeError('Runtime.HandlerNotFound', `${fullHandler} is not a function`);
  }
  const streaming = handler[HANDLER_STREAMING];
  if (streaming && streaming !== STREAM_RESPONSE) {
    throw runtimeError('Runtime.MalformedStreamingHandler', 'Only response streaming is supported.');
  }
  return handler;
}

// -- invocations ------------------------------------------------------------------------

let handler = null;
let handlerIsAsync = false;
let handlerStreams = false;
let ready = false;
let inflight = null; // {finished} of the invocation not yet answered
let onEmptyLoop = null; // what to do when the event loop runs dry during an invocation

process.on('beforeExit', () => {
  const action = onEmptyLoop;
  onEmptyLoop = null;
  if (action) {
    action();
  } else {
    control.ref(); // never leave without the daemon's word
  }
});

/** End the invocation in flight with one frame; later answers are ignored. */
function finish(call, kind, payload, done) {
  if (call.finished) {
    console.error('Invocation has already been reported as done. Cannot call complete more than once per invocation.');
    return;
  }
  call.finished = true;
  if (inflight === call) {
    inflight = null;
  }
  onEmptyLoop = null;
  control.ref();
  endLine();
  send(kind, payload, done);
}

function respond(call, result) {
  let data;
  try {
    data = JSON.stringify(result === undefined ? null : result);
  } catch (_) {
    fail(call, new Error('Unable to stringify response body'));
    return;
  }
  if (data === undefined) {
    data = 'null'; // a function or a symbol: nothing JSON can carry
  }
  const size = Buffer.byteLength(data, 'utf8');
  if (size > MAX_RESPONSE_BYTES) {
    finish(call, ERROR, tooLarge());
    return;
  }
  finish(call, RESULT, data);
}

/** A streaming handler's answer: its stream has ended (its chunks have gone before). */
function respondStreamed(call) {
  finish(call, RESULT, Buffer.alloc(0));
}

function tooLarge() {
  return JSON.stringify({
    errorType: 'Function.ResponseSizeTooLarge',
    errorMessage: `Response payload size exceeded maximum allowed payload size (${MAX_RESPONSE_BYTES} bytes).`,
    trace: [],
  });
}

function fail(call, error) {
  if (call.finished) {
    return;
  }
  logError('Invoke Error', error);
  finish(call, ERROR, JSON.stringify(describe(error)));
}

/** A new X-Ray trace header, in the format Lambda gives an invocation that came without one. */
function traceId() {
  const random = crypto.randomBytes(20).toString('hex');
  const seconds = Math.floor(Date.now() / 1000).toString(16).padStart(8, '0');
  return `Root=1-${seconds}-${random.slice(0, 24)};Parent=${random.slice(24)};Sampled=0`;
}

function invoke(payload) {
  const newline = payload.indexOf(10);
  const header = JSON.parse(payload.subarray(0, newline).toString('utf8'));
  const body = payload.subarray(newline + 1);
  globalThis[REQUEST_ID] = header.id;
  process.env._X_AMZN_TRACE_ID = header.trace || traceId();
  const call = { finished: false };
  inflight = call;
  let event;
  try {
    event = body.length ? JSON.parse(body.toString('utf8')) : null;
  } catch (error) {
    finish(call, ERROR, JSON.stringify({
      errorType: 'Runtime.UnmarshalError', errorMessage: `Unable to unmarshal input: ${error.message}`, trace: [],
    }));
    return;
  }

  const deadline = Number(header.deadline_ms);
  const environment = {
    functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
    functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
    memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: process.env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: process.env.AWS_LAMBDA_LOG_STREAM_NAME,
    clientContext: header.client_context,
    identity: undefined,
    invokedFunctionArn: header.arn,
    awsRequestId: header.id,
    tenantId: undefined, // Lambda's tenant isolation mode, which faasd does not have
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
  control.unref();
  if (handlerStreams) {
    invokeStreaming(call, event, environment);
  } else {
    invokeWithCallback(call, event, environment);
  }
}

/** An async or promise handler, or one that answers through its callback or the context. */
function invokeWithCallback(call, event, environment) {
  let waitForEmptyEventLoop = true;
  let answered = false; // only the first of callback/succeed/fail/done counts
  const once = (fn) => (...args) => {
    if (!answered) {
      answered = true;
      fn(...args);
    }
  };
  const done = (error, result) => {
    onEmptyLoop = null;
    if (error !== undefined && error !== null) {
      fail(call, error);
    } else {
      respond(call, result);
    }
  };
  const callback = once((error, result) => {
    onEmptyLoop = null;
    if (error !== undefined && error !== null) {
      fail(call, error);
    } else if (!waitForEmptyEventLoop) {
      respond(call, result);
    } else {
      onEmptyLoop = () => setImmediate(() => respond(call, result));
    }
  });
  const context = {
    get callbackWaitsForEmptyEventLoop() {
      return waitForEmptyEventLoop;
    },
    set callbackWaitsForEmptyEventLoop(value) {
      waitForEmptyEventLoop = value;
    },
    succeed: once((result) => done(null, result)),
    fail: once((error) => done(error === undefined || error === null ? 'handled' : error, null)),
    done: once(done),
    ...environment,
  };

  // If the loop runs dry before the handler answered: an async handler left a
  // promise unsettled (an error); any other handler answers null, as on Lambda.
  onEmptyLoop = handlerIsAsync
    ? () => fail(call, runtimeError('Runtime.NodeJsExit',
      'Runtime exited without providing a reason: the handler returned a Promise that was never settled'))
    : () => respond(call, null);
  try {
    const result = handler(event, context, callback);
    if (result && typeof result.then === 'function') {
      result.then(context.succeed, context.fail);
    }
  } catch (error) {
    callback(error);
  }
}

/** A streamified handler, `(event, responseStream, context)`: it answers once its promise
 * has settled and the stream has ended. */
function invokeStreaming(call, event, environment) {
  const context = { callbackWaitsForEmptyEventLoop: true, ...environment };
  const stream = new ResponseStream(call);
  let returned = false;
  const settle = () => {
    if (returned && stream.writableFinished) {
      respondStreamed(call);
    }
  };
  stream.on('finish', settle);
  stream.on('error', (error) => fail(call, error));
  // The stream has ended but the handler's promise never settles: the response stands.
  onEmptyLoop = () => (stream.writableFinished
    ? respondStreamed(call)
    : fail(call, 'Response stream is not finished.'));
  let result;
  try {
    result = handler(event, stream, context);
  } catch (error) {
    fail(call, error);
    return;
  }
  if (!result || typeof result.then !== 'function') {
    fail(call, 'Streaming does not support non-async handlers.');
    return;
  }
  result.then((value) => {
    if (value !== undefined) {
      console.warn('Streaming handlers ignore return values.');
    }
    returned = true;
    settle();
  }, (error) => fail(call, error));
}

// An exception nothing caught ends the process, as on Lambda: the invocation
// in flight fails with it (or init does), and the daemon starts a new worker.
function die(error, code) {
  if (!ready) {
    send(INIT_ERROR, JSON.stringify(describe(error)), () => process.exit(code));
  } else if (inflight !== null) {
    const call = inflight;
    finish(call, ERROR, JSON.stringify({ ...describe(error), fatal: true }), () => process.exit(code));
  } else {
    send(LOG, '', () => process.exit(code));
  }
}

process.on('uncaughtException', (error) => {
  logError('Uncaught Exception', error);
  die(error, 129);
});

process.on('unhandledRejection', (reason) => {
  // AWS's runtime: new Error(reason?.toString()), so undefined and null give an empty message.
  let message;
  try {
    message = reason == null ? '' : String(reason);
  } catch (_) {
    message = Object.prototype.toString.call(reason); // an object without toString
  }
  const error = runtimeError('Runtime.UnhandledPromiseRejection', message);
  logError('Unhandled Promise Rejection', error);
  die(error, 128);
});

async function main() {
  patchConsole();
  patchStreams();
  try {
    handler = await loadHandler();
  } catch (error) {
    if (!(error && String(error.name).startsWith('Runtime.'))) {
      logError('Uncaught Exception', error); // the module's own code threw
    }
    endLine();
    send(INIT_ERROR, JSON.stringify(describe(error)), () => process.exit(1));
    return;
  }
  handlerIsAsync = Boolean(handler.constructor && handler.constructor.name === 'AsyncFunction');
  handlerStreams = handler[HANDLER_STREAMING] === STREAM_RESPONSE;
  // READY after a turn of the loop, as AWS's runtime asks for its first event from a
  // setImmediate: a promise the module left rejected, with nothing to catch it, fails init.
  setImmediate(() => {
    ready = true;
    endLine();
    send(READY, JSON.stringify({ init_ms: Number(process.hrtime.bigint() - T0) / 1e6 }));
  });
}

main();
