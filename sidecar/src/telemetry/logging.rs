//! The log filter, changeable at run time through the admin server's `/logging`.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

type Apply = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The filter in force and how to replace it.
pub struct LogControl {
    current: Mutex<String>,
    apply: Apply,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Why a filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The text is not an env-filter directive list.
    #[error("invalid filter {0:?}: {1}")]
    Invalid(String, String),
    /// This process set up logging without a reloadable filter.
    #[error("the log filter of this process cannot be changed at run time")]
    NotReloadable,
    /// The subscriber is gone.
    #[error("cannot apply the filter: {0}")]
    Apply(String),
}

/// Installs the process's log control; the first call wins.
pub fn install(initial: &str, apply: Apply) {
    let _ = CONTROL.set(LogControl {
        current: Mutex::new(initial.to_owned()),
        apply,
    });
}

/// Sets up `tracing` with a reloadable filter and `fmt` output to `writer`, and installs the
/// control. Does nothing when a global subscriber exists already.
pub fn init<W>(filter: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let initial = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let shown = initial.to_string();
    let (layer, handle) = tracing_subscriber::reload::Layer::new(initial);
    let installed = tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(writer))
        .try_init();
    if installed.is_ok() {
        install(
            &shown,
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
        );
    }
}

/// The filter in force, if this process has a reloadable one.
pub fn current() -> Option<String> {
    let c = CONTROL.get()?;
    let s = c.current.lock().unwrap_or_else(|p| p.into_inner());
    Some(s.clone())
}

/// Replaces the filter.
pub fn set(filter: &str) -> Result<String, LogError> {
    let c = CONTROL.get().ok_or(LogError::NotReloadable)?;
    let parsed = EnvFilter::try_new(filter.trim())
        .map_err(|e| LogError::Invalid(filter.trim().to_owned(), e.to_string()))?;
    let shown = parsed.to_string();
    (c.apply)(parsed).map_err(LogError::Apply)?;
    *c.current.lock().unwrap_or_else(|p| p.into_inner()) = shown.clone();
    tracing::info!(filter = %shown, "log filter changed");
    Ok(shown)
}
