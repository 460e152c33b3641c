// The official OpenAI Node SDK through the gateway. Run by tests/sdk/test_openai_node.py, one test at a time
// (--test-name-pattern), against the suite's mock upstream and gateway; that test then checks what upstream
// received. Here: what the client got, and what the SDK put on the wire (written to MANTLEGATE_SENT_FILE).
//
// Environment: MANTLEGATE_URL (gateway, http://host:port), MANTLEGATE_KEY, MANTLEGATE_WRONG_KEY,
// MANTLEGATE_FORBIDDEN_PROJECT, MOCK_TEXT (what the mock answers), MANTLEGATE_SDK_NODE_MODULES (where
// `openai` is installed), MANTLEGATE_SENT_FILE.
import assert from 'node:assert/strict';
import { appendFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} must be set (run through tests/sdk/test_openai_node.py)`);
  return value;
};

const require = createRequire(path.join(env('MANTLEGATE_SDK_NODE_MODULES'), '..', 'package.json'));
const { OpenAI } = require('openai');

const MODEL = 'openai.gpt-oss-120b';
const MESSAGES = [{ role: 'user', content: 'Say hello from Node' }];
const TEXT = env('MOCK_TEXT');

// Records each request the SDK sends, then sends it.
function recordingFetch(url, init = {}) {
  const headers = Object.fromEntries(new Headers(init.headers).entries());
  const body = typeof init.body === 'string' ? init.body : null;
  appendFileSync(
    env('MANTLEGATE_SENT_FILE'),
    JSON.stringify({ method: init.method, url: String(url), headers, body }) + '\n',
  );
  return fetch(url, init);
}

function client(options = {}) {
  return new OpenAI({
    apiKey: env('MANTLEGATE_KEY'),
    baseURL: `${env('MANTLEGATE_URL')}/v1`,
    maxRetries: 0,
    timeout: 20_000,
    fetch: recordingFetch,
    ...options,
  });
}

test('chat streaming', async () => {
  const stream = await client().chat.completions.create({
    model: MODEL,
    messages: MESSAGES,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);

  assert.equal(chunks.map((c) => c.choices[0]?.delta?.content ?? '').join(''), TEXT);
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.prompt_tokens, 11);
  assert.equal(chunks.at(-2).choices[0].finish_reason, 'stop');
});

test('responses create', async () => {
  const response = await client().responses.create({ model: MODEL, input: 'Say hello from Node' });

  assert.equal(response.id, 'resp_mock');
  assert.equal(response.status, 'completed');
  assert.equal(response.output_text, TEXT);
  assert.equal(response.usage.input_tokens_details.cached_tokens, 2);
});

test('responses stream', async () => {
  const stream = await client().responses.create({ model: MODEL, input: 'Say hello from Node', stream: true });
  const events = [];
  for await (const event of stream) events.push(event);

  const types = events.map((e) => e.type);
  assert.equal(types[0], 'response.created');
  assert.equal(types.at(-1), 'response.completed');
  assert.deepEqual(
    events.map((e) => e.sequence_number),
    events.map((_, i) => i),
  );
  const deltas = events.filter((e) => e.type === 'response.output_text.delta').map((e) => e.delta);
  assert.equal(deltas.join(''), TEXT);
  assert.equal(events.at(-1).response.usage.output_tokens, deltas.length);
});

test('forbidden project', async () => {
  const project = env('MANTLEGATE_FORBIDDEN_PROJECT');
  await assert.rejects(
    client({ project }).chat.completions.create({ model: MODEL, messages: MESSAGES }),
    (err) => {
      assert.ok(err instanceof OpenAI.PermissionDeniedError, `expected PermissionDeniedError, got ${err}`);
      assert.equal(err.status, 403);
      assert.equal(err.code, 'project_not_allowed');
      assert.equal(err.type, 'permission_error');
      assert.ok(err.requestID, 'the gateway error carries x-request-id');
      return true;
    },
  );
});

test('wrong key', async () => {
  await assert.rejects(
    client({ apiKey: env('MANTLEGATE_WRONG_KEY') }).models.list(),
    (err) => {
      assert.ok(err instanceof OpenAI.AuthenticationError, `expected AuthenticationError, got ${err}`);
      assert.equal(err.status, 401);
      assert.equal(err.code, 'invalid_api_key');
      return true;
    },
  );
});
