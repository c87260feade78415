//! Every change of a job's state in Redis, each one Lua script so that it is
//! atomic: two workers finishing the same job, a cancel racing a worker's take,
//! a retry racing a reclaim all leave one consistent job.
//!
//! A job's hash `state` goes `queued` -> `taken` (a worker holds it) -> `running`
//! (its batch started) -> `succeeded` | `failed` | `cancelled`; once final it never
//! changes and its `result` is never rewritten.
//! Its `entry` names the stream entry that carries it now: a script given an
//! older entry only acknowledges and deletes that entry.

use std::sync::LazyLock;

use redis::Script;

/// Lua shared by the scripts of a job's state, by their common layout: `KEYS[1]`
/// is the job's hash, `KEYS[2]` its model's stream, and (where a worker names its
/// entry) `ARGV[1]` the entry, `ARGV[2]` the consumer group.
const PRELUDE: &str = r#"
local function over(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end
local function release_entry()
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
end
local function finish(state, result, now, ttl, channel)
  redis.call('HSET', KEYS[1], 'state', state, 'result', result, 'finished', now)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('PUBLISH', channel, '{"event":"done"}')
end
"#;

/// A script of the job's state: [`PRELUDE`] then `body`.
fn with_prelude(body: &str) -> Script {
    Script::new(&[PRELUDE, body].concat())
}

/// Queues a job: the stream entry and the hash, unless the model's stream holds
/// `capacity` entries, or the idempotency key already names a job.
///
/// KEYS: job, queue, idempotency key. ARGV: id, spec, model, client, created ms,
/// capacity, idempotency TTL s, whether a key is given (`1`).
/// Returns `{"new", entry, length before}`, `{"existing", id}` or `{"full", length}`.
pub static SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
local len = redis.call('XLEN', KEYS[2])
if len >= tonumber(ARGV[6]) then return {'full', tostring(len)} end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'model', ARGV[3], 'client', ARGV[4],
  'created', ARGV[5], 'state', 'queued', 'entry', entry, 'attempts', 0)
if ARGV[8] == '1' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[7]) end
return {'new', entry, tostring(len)}
"#,
    )
});

/// A worker takes a delivered entry: skips (acknowledging) an entry whose job is
/// gone, over or carried by a newer entry; ends a job cancelled while it waited;
/// counts the attempt and marks the job taken, or reports it spent.
///
/// KEYS: job, queue, running set. ARGV: entry, group, worker, now ms, max
/// attempts, id, TTL s, event channel, the cancelled result JSON.
/// Returns `{"run", spec, attempts, created ms}`, `{"dead", attempts, last error}` or
/// `{"skip", why}`.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r#"
local function drop(why)
  release_entry()
  return {'skip', why}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return drop('gone') end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[1] then return drop('stale') end
if over(state) then return drop('over') end
if redis.call('HGET', KEYS[1], 'cancel') == 'cancel' then
  finish('cancelled', ARGV[9], ARGV[4], ARGV[7], ARGV[8])
  redis.call('SREM', KEYS[3], ARGV[6])
  return drop('cancelled')
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[5]) then
  return {'dead', tostring(attempts - 1), redis.call('HGET', KEYS[1], 'last_error') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'taken', 'worker', ARGV[3], 'taken', ARGV[4], 'step', 0)
redis.call('SADD', KEYS[3], ARGV[6])
return {'run', redis.call('HGET', KEYS[1], 'spec'), tostring(attempts),
  redis.call('HGET', KEYS[1], 'created') or '0'}
"#,
    )
});

/// Ends a job with its result, once: a job already over, or carried by a newer
/// entry, keeps what it has (the call only acknowledges its entry). With an
/// error for the dead-letter stream, the job goes there too.
///
/// KEYS: job, queue, running set, dead-letter stream. ARGV: entry, group,
/// result JSON, state, TTL s, now ms, id, event channel, dead-letter error (empty:
/// none), model, attempts.
/// Returns 1 when written, 0 when the result was already there.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
local current = redis.call('HGET', KEYS[1], 'entry') == ARGV[1]
release_entry()
if not state or not current or over(state) then return 0 end
redis.call('HDEL', KEYS[1], 'preview')
redis.call('SREM', KEYS[3], ARGV[7])
if ARGV[9] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', 'job', ARGV[7], 'model', ARGV[10],
    'error', ARGV[9], 'attempts', ARGV[11])
end
finish(ARGV[4], ARGV[3], ARGV[6], ARGV[5], ARGV[8])
return 1
"#,
    )
});

/// Puts a running job back at the end of its queue under a new entry: after a
/// failed attempt (the error kept as `last_error`), or released unstarted by a
/// draining worker (the attempt not counted).
///
/// KEYS: job, queue, running set. ARGV: entry, group, error (empty: a release),
/// id.
/// Returns 1 when queued again, 0 when the job was over or carried elsewhere.
pub static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
local current = redis.call('HGET', KEYS[1], 'entry') == ARGV[1]
release_entry()
if (state ~= 'running' and state ~= 'taken') or not current then return 0 end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'step', 0)
redis.call('HDEL', KEYS[1], 'worker', 'taken', 'started', 'preview')
if ARGV[3] == '' then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
else
  redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
end
redis.call('SREM', KEYS[3], ARGV[4])
return 1
"#,
    )
});

/// Asks a job to stop (`cancel`) or to answer with its pictures so far
/// (`interrupt`); a job still waiting that is cancelled ends at once.
///
/// KEYS: job, queue. ARGV: mode, now ms, TTL s, event channel, the cancelled
/// result JSON.
/// Returns `missing`, `over`, `cancelled` (it waited) or `requested`.
pub static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    with_prelude(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if over(state) then return 'over' end
if state == 'queued' then
  redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry'))
  redis.call('HSET', KEYS[1], 'cancel', 'cancel')
  finish('cancelled', ARGV[5], ARGV[2], ARGV[3], ARGV[4])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
return 'requested'
"#,
    )
});

/// Records a taken or running job's progress (never a job that is over, or
/// whose hash has expired): its start (`running`, with the start time), steps and
/// previews; publishes the event.
///
/// KEYS: job. ARGV: step, total, batch, preview (empty: none), event channel,
/// event JSON, now ms.
pub static PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'taken' then return 0 end
if state == 'taken' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[7])
end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'total', ARGV[2], 'batch', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'preview', ARGV[4]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"#,
    )
});
