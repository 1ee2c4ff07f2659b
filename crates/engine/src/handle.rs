//! The engine on its own thread behind a bounded channel: the CLI, benchmarks and the server
//! share this handle, and a panic inside one generation fails only that job.

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::pipeline::{Generation, Pipeline};
use crate::samplers::StepReport;
use crate::settings::GenerationRequest;

/// Per-step callback of a job; returning `Break` cancels it between steps.
pub type Progress = Box<dyn FnMut(&StepReport) -> ControlFlow<()> + Send>;

struct Job {
    request: GenerationRequest,
    progress: Progress,
    reply: mpsc::Sender<Result<Generation>>,
}

pub struct EngineHandle {
    jobs: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
    config: ModelConfig,
}

impl EngineHandle {
    /// Start the engine thread; at most `queue` jobs wait in the channel.
    pub fn spawn(pipeline: Pipeline, queue: usize) -> Result<Self> {
        let config = pipeline.config().clone();
        let (tx, rx) = mpsc::sync_channel::<Job>(queue.max(1));
        let worker = std::thread::Builder::new()
            .name("flowgen-engine".into())
            .spawn(move || run(pipeline, rx))
            .map_err(|e| Error::EnginePanicked(format!("cannot start engine thread: {e}")))?;
        Ok(Self { jobs: Some(tx), worker: Some(worker), config })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Queue a job, waiting while the channel is full. The reply arrives on the receiver.
    pub fn submit(&self, request: GenerationRequest, progress: Progress) -> Result<Receiver<Result<Generation>>> {
        let (reply, rx) = mpsc::channel();
        let jobs = self.jobs.as_ref().ok_or(Error::EngineStopped)?;
        jobs.send(Job { request, progress, reply }).map_err(|_| Error::EngineStopped)?;
        Ok(rx)
    }

    /// Queue a job without waiting; `Ok(None)` when the channel is full.
    pub fn try_submit(
        &self,
        request: GenerationRequest,
        progress: Progress,
    ) -> Result<Option<Receiver<Result<Generation>>>> {
        let (reply, rx) = mpsc::channel();
        let jobs = self.jobs.as_ref().ok_or(Error::EngineStopped)?;
        match jobs.try_send(Job { request, progress, reply }) {
            Ok(()) => Ok(Some(rx)),
            Err(TrySendError::Full(_)) => Ok(None),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineStopped),
        }
    }

    /// Submit and wait for the result.
    pub fn generate(&self, request: GenerationRequest, progress: Progress) -> Result<Generation> {
        self.submit(request, progress)?.recv().map_err(|_| Error::EngineStopped)?
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        // Closing the channel lets the thread finish queued jobs and exit.
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn run(pipeline: Pipeline, jobs: Receiver<Job>) {
    for mut job in jobs {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            pipeline.generate(&job.request.settings, &job.request.inputs, &mut job.progress)
        }));
        let result = outcome.unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(error = %msg, "engine panicked during a generation");
            Err(Error::EnginePanicked(msg))
        });
        // The requester may have gone away; nothing to do then.
        let _ = job.reply.send(result);
    }
}
