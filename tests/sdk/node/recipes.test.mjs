// The README's Node recipes for choosing a project: LangChain JS (@langchain/openai's ChatOpenAI) and the Vercel
// AI SDK (ai + @ai-sdk/openai). Run by tests/sdk/test_node_recipes.py, one test at a time (--test-name-pattern),
// against the suite's mock upstream and gateway; that test then checks what upstream received. Here: what the
// client got, and what went on the wire (written to MANTLEGATE_SENT_FILE).
//
// Nothing but the gateway: every fetch is recorded, and any fetch, name lookup or TCP connect to anything else
// is refused before it leaves, and fails the test.
//
// Environment: MANTLEGATE_URL (gateway, http://host:port), MANTLEGATE_KEY, MANTLEGATE_PROJECT (one the key
// may select), MANTLEGATE_FORBIDDEN_PROJECT, MOCK_TEXT (what the mock answers), MANTLEGATE_SDK_NODE_MODULES,
// MANTLEGATE_SENT_FILE.
import assert from 'node:assert/strict';
import dns from 'node:dns';
import { appendFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { after, test } from 'node:test';

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} must be set (run through tests/sdk/test_node_recipes.py)`);
  return value;
};

const GATEWAY = env('MANTLEGATE_URL');
const KEY = env('MANTLEGATE_KEY');
const PROJECT = env('MANTLEGATE_PROJECT');
const TEXT = env('MOCK_TEXT');
const MODEL = 'openai.gpt-oss-120b';

// --- nothing but the gateway ----------------------------------------------------------------------------------
const refused = [];
const loopback = (host) => host === 'localhost' || host === '::1' || /^127\./.test(host ?? '');
const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init = {}) => {
  const url = String(input instanceof Request ? input.url : input);
  const headers = Object.fromEntries(new Headers(init.headers ?? (input instanceof Request ? input.headers : {})).entries());
  const body = typeof init.body === 'string' ? init.body : null;
  appendFileSync(env('MANTLEGATE_SENT_FILE'), JSON.stringify({ method: init.method ?? 'GET', url, headers, body }) + '\n');
  if (!url.startsWith(`${GATEWAY}/`)) {
    refused.push(`fetch ${url}`);
    throw new Error(`tests/sdk: refused a fetch of ${url}: the suite reaches nothing but the gateway`);
  }
  return realFetch(input, init);
};
const realConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  // net.connect() hands its arguments on normalized, as one array [options, callback].
  const first = Array.isArray(args[0]) ? args[0][0] : args[0];
  const options = typeof first === 'object' ? first : { port: first, host: args[1] };
  if (!options.path && !loopback(options.host ?? 'localhost')) {
    refused.push(`connect to ${options.host}:${options.port}`);
    throw new Error(`tests/sdk: refused a connect to ${options.host}: the suite reaches nothing but loopback`);
  }
  return realConnect.apply(this, args);
};
const realLookup = dns.lookup;
dns.lookup = function (host, ...args) {
  if (!loopback(host)) {
    refused.push(`lookup of ${host}`);
    throw new Error(`tests/sdk: refused a lookup of ${host}: the suite reaches nothing but loopback`);
  }
  return realLookup.call(this, host, ...args);
};
after(() => assert.deepEqual(refused, [], 'outside traffic was refused'));

const require = createRequire(path.join(env('MANTLEGATE_SDK_NODE_MODULES'), '..', 'package.json'));
const { ChatOpenAI } = require('@langchain/openai');
const { generateText, streamText } = require('ai');
const { createOpenAI } = require('@ai-sdk/openai');

// --- LangChain JS ---------------------------------------------------------------------------------------------

// The README's recipe, with the suite's gateway, key and project.
const langchainModel = (project) =>
  new ChatOpenAI({
    model: MODEL,
    apiKey: KEY,
    configuration: { baseURL: `${GATEWAY}/v1`, defaultHeaders: { 'OpenAI-Project': project } },
  });

test('langchain invoke', async () => {
  const answer = await langchainModel(PROJECT).invoke('Say hello');

  assert.equal(answer.content, TEXT);
  assert.equal(answer.usage_metadata.output_tokens, 3); // the mock's three pieces
});

test('langchain stream', async () => {
  const pieces = [];
  for await (const chunk of await langchainModel(PROJECT).stream('Say hello')) pieces.push(chunk.content);

  assert.equal(pieces.join(''), TEXT);
});

test('langchain forbidden project', async () => {
  await assert.rejects(langchainModel(env('MANTLEGATE_FORBIDDEN_PROJECT')).invoke('Say hello'), (err) => {
    assert.equal(err.status, 403, `expected a 403, got ${err}`);
    assert.equal(err.code, 'project_not_allowed');
    return true;
  });
});

// --- Vercel AI SDK --------------------------------------------------------------------------------------------

// The README's recipe, with the suite's gateway, key and project.
const aiProvider = (project) => createOpenAI({ baseURL: `${GATEWAY}/v1`, apiKey: KEY, project });

test('ai-sdk generateText', async () => {
  // openai(model) is the Responses API (POST /v1/responses).
  const openai = aiProvider(PROJECT);
  const { text, usage } = await generateText({ model: openai(MODEL), prompt: 'Say hello' });

  assert.equal(text, TEXT);
  assert.equal(usage.outputTokens, 3); // the mock's three pieces
});

test('ai-sdk chat streamText', async () => {
  // openai.chat(model) is Chat Completions (POST /v1/chat/completions).
  const openai = aiProvider(PROJECT);
  const result = streamText({ model: openai.chat(MODEL), prompt: 'Say hello' });
  const pieces = [];
  for await (const piece of result.textStream) pieces.push(piece);

  assert.equal(pieces.join(''), TEXT);
  assert.equal((await result.usage).outputTokens, 3); // the mock's three pieces
});

test('ai-sdk forbidden project', async () => {
  const openai = aiProvider(env('MANTLEGATE_FORBIDDEN_PROJECT'));
  await assert.rejects(generateText({ model: openai(MODEL), prompt: 'Say hello', maxRetries: 0 }), (err) => {
    assert.equal(err.statusCode, 403, `expected a 403, got ${err}`);
    assert.equal(JSON.parse(err.responseBody).error.code, 'project_not_allowed');
    return true;
  });
});
