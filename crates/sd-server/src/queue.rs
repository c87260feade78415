//! The job queue: bounded per model, fair between clients (round robin over each
//! client's own line), handing workers batches of compatible jobs. It knows nothing
//! of HTTP.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::ApiError;
use crate::job::JobSpec;
use crate::store::JobHandle;

/// What jobs must share to run in one U-Net batch (see
/// [`sd_pipelines::batchable`]); `None` for jobs that run alone.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    size: Option<(usize, usize)>,
    steps: usize,
    guidance: u64,
    scheduler: Option<String>,
    sigma_schedule: String,
}

impl BatchKey {
    /// The key of a job, `None` when it cannot share a batch.
    pub fn of(spec: &JobSpec) -> Option<Self> {
        let plain = spec.init.is_none()
            && spec.loras.is_empty()
            && spec.hires.is_none()
            && spec.control.is_empty();
        plain.then(|| Self {
            size: spec.size,
            steps: spec.steps,
            guidance: spec.guidance.to_bits(),
            scheduler: spec.scheduler.as_ref().map(|s| s.to_ascii_lowercase()),
            sigma_schedule: format!("{:?}", spec.sigma_schedule),
        })
    }
}

#[derive(Debug, Default)]
struct ModelLine {
    /// Each client's jobs in order; the front client is served next.
    clients: VecDeque<(String, VecDeque<Arc<JobHandle>>)>,
    len: usize,
}

impl ModelLine {
    fn push(&mut self, job: Arc<JobHandle>) {
        let client = job.spec.client.clone();
        match self.clients.iter_mut().find(|(c, _)| *c == client) {
            Some((_, jobs)) => jobs.push_back(job),
            None => self.clients.push_back((client, VecDeque::from([job]))),
        }
        self.len += 1;
    }

    /// Jobs that would be served before `id` (fair order).
    fn position(&self, id: &str) -> Option<usize> {
        let (ci, k) = self
            .clients
            .iter()
            .enumerate()
            .find_map(|(ci, (_, jobs))| jobs.iter().position(|j| j.id == id).map(|k| (ci, k)))?;
        let ahead = self
            .clients
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != ci)
            .map(|(i, (_, jobs))| jobs.len().min(k + usize::from(i < ci)))
            .sum::<usize>();
        Some(ahead + k)
    }

    fn remove(&mut self, id: &str) -> Option<Arc<JobHandle>> {
        for (_, jobs) in &mut self.clients {
            if let Some(k) = jobs.iter().position(|j| j.id == id) {
                self.len -= 1;
                let job = jobs.remove(k);
                self.clients.retain(|(_, j)| !j.is_empty());
                return job;
            }
        }
        None
    }

    /// The next job in fair order, then up to `max - 1` jobs with its batch key, one
    /// per client per round, clients in their turn order.
    fn take_batch(&mut self, max: usize) -> Vec<Arc<JobHandle>> {
        let Some((client, mut jobs)) = self.clients.pop_front() else {
            return Vec::new();
        };
        let first = jobs.pop_front().expect("client lines are never empty");
        if !jobs.is_empty() {
            self.clients.push_back((client, jobs));
        }
        let key = BatchKey::of(&first.spec);
        let mut batch = vec![first];
        while let Some(k) = key.as_ref().filter(|_| batch.len() < max) {
            let mut took = false;
            for (_, jobs) in &mut self.clients {
                if batch.len() >= max {
                    break;
                }
                if let Some(i) = jobs
                    .iter()
                    .position(|j| BatchKey::of(&j.spec).as_ref() == Some(k))
                {
                    batch.extend(jobs.remove(i));
                    took = true;
                }
            }
            if !took {
                break;
            }
        }
        self.clients.retain(|(_, j)| !j.is_empty());
        self.len -= batch.len();
        batch
    }
}

#[derive(Debug, Default)]
struct Lines {
    models: BTreeMap<String, ModelLine>,
    /// The model served last, for round robin between models.
    last: Option<String>,
    closed: bool,
}

/// The queues of every model.
#[derive(Debug)]
pub struct JobQueue {
    lines: Mutex<Lines>,
    ready: Condvar,
    capacity: usize,
}

impl JobQueue {
    /// Queues holding at most `capacity` waiting jobs per model.
    pub fn new(capacity: usize) -> Self {
        Self {
            lines: Mutex::new(Lines::default()),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lines> {
        crate::lock(&self.lines)
    }

    /// Queues a job; its position (0: next).
    ///
    /// # Errors
    /// [`ApiError::QueueFull`] when its model has `capacity` jobs waiting;
    /// [`ApiError::Unavailable`] after [`Self::close`].
    pub fn push(&self, job: Arc<JobHandle>) -> Result<usize, ApiError> {
        let mut lines = self.lock();
        if lines.closed {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        let model = job.spec.model.clone();
        let line = lines.models.entry(model.clone()).or_default();
        if line.len >= self.capacity {
            return Err(ApiError::QueueFull {
                model,
                retry_after: Duration::from_secs(2 + line.len as u64 / 4),
            });
        }
        let id = job.id.clone();
        line.push(job);
        crate::metrics::queue_depth(&model, line.len);
        let position = line.position(&id).unwrap_or(0);
        drop(lines);
        self.ready.notify_one();
        Ok(position)
    }

    /// Jobs ahead of job `id` of `model`, `None` when it is not waiting.
    pub fn position(&self, model: &str, id: &str) -> Option<usize> {
        self.lock().models.get(model)?.position(id)
    }

    /// Takes a waiting job out (a cancel); whether it was waiting.
    pub fn remove(&self, model: &str, id: &str) -> bool {
        let mut lines = self.lock();
        let Some(line) = lines.models.get_mut(model) else {
            return false;
        };
        let removed = line.remove(id).is_some();
        crate::metrics::queue_depth(model, line.len);
        removed
    }

    /// Jobs waiting for `model`.
    pub fn depth(&self, model: &str) -> usize {
        self.lock().models.get(model).map_or(0, |l| l.len)
    }

    /// Jobs waiting in all.
    pub fn total(&self) -> usize {
        self.lock().models.values().map(|l| l.len).sum()
    }

    /// Blocks until jobs wait, then takes a batch of up to `max` compatible jobs of
    /// one model (models served in turn); `None` once closed and empty.
    pub fn pop_batch(&self, max: usize) -> Option<Vec<Arc<JobHandle>>> {
        let mut lines = self.lock();
        loop {
            let next = {
                let after = lines.last.clone().unwrap_or_default();
                let waiting = |(m, l): (&String, &ModelLine)| (l.len > 0).then(|| m.clone());
                let later = lines
                    .models
                    .range(after.clone()..)
                    .filter(|(m, _)| **m != after);
                later
                    .filter_map(waiting)
                    .next()
                    .or_else(|| lines.models.iter().filter_map(waiting).next())
            };
            if let Some(model) = next {
                let line = lines.models.get_mut(&model).expect("found above");
                let batch = line.take_batch(max);
                crate::metrics::queue_depth(&model, line.len);
                lines.last = Some(model);
                return Some(batch);
            }
            if lines.closed {
                return None;
            }
            lines = self
                .ready
                .wait(lines)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Refuses new jobs and wakes the workers, which finish what waits and stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Takes every waiting job out (shutting down: nobody would fetch their results).
    pub fn drain(&self) -> Vec<Arc<JobHandle>> {
        let mut lines = self.lock();
        let mut out = Vec::new();
        for (model, line) in &mut lines.models {
            for (_, jobs) in line.clients.drain(..) {
                out.extend(jobs);
            }
            line.len = 0;
            crate::metrics::queue_depth(model, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(client: &str, steps: usize) -> Arc<JobHandle> {
        let mut spec = JobSpec::txt2img("m", "p");
        spec.client = client.into();
        spec.steps = steps;
        JobHandle::new(spec)
    }

    #[test]
    fn one_clients_many_jobs_do_not_starve_another() {
        let q = JobQueue::new(200);
        for _ in 0..100 {
            q.push(job("greedy", 20)).unwrap();
        }
        let lone = job("polite", 21);
        assert_eq!(q.push(lone.clone()).unwrap(), 1);
        let first = q.pop_batch(1).unwrap();
        assert_eq!(first[0].spec.client, "greedy");
        let second = q.pop_batch(1).unwrap();
        assert_eq!(second[0].id, lone.id);
    }

    #[test]
    fn batches_compatible_jobs_across_clients() {
        let q = JobQueue::new(10);
        q.push(job("a", 20)).unwrap();
        q.push(job("a", 30)).unwrap();
        q.push(job("b", 20)).unwrap();
        q.push(job("c", 20)).unwrap();
        let batch = q.pop_batch(4).unwrap();
        assert_eq!(batch.len(), 3);
        assert!(batch.iter().all(|j| j.spec.steps == 20));
        assert_eq!(q.depth("m"), 1);
    }

    #[test]
    fn full_queue_refuses() {
        let q = JobQueue::new(2);
        q.push(job("a", 1)).unwrap();
        q.push(job("b", 1)).unwrap();
        assert!(matches!(
            q.push(job("c", 1)),
            Err(ApiError::QueueFull { .. })
        ));
        let j = job("a", 1);
        assert!(!q.remove("m", &j.id));
        let q2 = JobQueue::new(4);
        q2.push(job("a", 1)).unwrap();
        q2.push(job("b", 2)).unwrap();
        q2.close();
        assert_eq!(q2.drain().len(), 2);
        assert!(q2.pop_batch(4).is_none());
        q.close();
        assert!(matches!(q.push(job("d", 1)), Err(ApiError::Unavailable(_))));
        // Closed: what waits is still handed out (one batch of both), then nothing.
        assert_eq!(q.pop_batch(4).unwrap().len(), 2);
        assert!(q.pop_batch(4).is_none());
    }
}
