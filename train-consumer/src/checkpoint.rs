//! Checkpoints: `OUT/checkpoint-<step>/`, each written whole into a hidden temporary
//! directory and renamed into place, so a directory with that name is always complete
//! (a run killed while writing one leaves only the temporary, which the next start
//! removes). Inside: the model files of the trained weights (the task's layout:
//! diffusers `transformer/`, BFL `redux.safetensors`), `ema/` with the averaged
//! weights when EMA is on, `optimizer.safetensors` (AdamW moments by variable), and
//! `trainer_state.json` (step, data position, noise state), written last.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::config::Mode;

/// The file that marks a checkpoint's state, written last inside it.
pub const STATE_FILE: &str = "trainer_state.json";
/// AdamW's moments, `m.<var>` / `v.<var>`.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The EMA weights' sub-directory (same layout as the checkpoint's model files).
pub const EMA_DIR: &str = "ema";

/// Where a run is, everything but tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// The data epoch the next micro-batch comes from.
    pub epoch: u64,
    /// The next micro-batch's index within its epoch.
    pub batch_in_epoch: usize,
    /// The noise stream's state ([`crate::noise::Noise::state`]).
    pub noise: u64,
    /// Samples seen so far.
    pub samples_seen: u64,
    /// The mode that trained it.
    pub mode: Mode,
    /// The trained variables, by name.
    pub trained: Vec<String>,
    /// Whether `ema/` holds averaged weights.
    pub ema: bool,
    /// tensorbake's version.
    pub tensorbake: String,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `OUT/checkpoint-<step>`.
#[must_use]
pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// The complete checkpoints in `out` (name `checkpoint-<step>` and a readable state
/// file), by step.
#[must_use]
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let dir = e.path();
            read_state(&dir).ok()?;
            Some((step, dir))
        })
        .collect();
    v.sort();
    v
}

/// Reads a checkpoint's state file.
///
/// # Errors
/// [`TrainError::Checkpoint`] when it is missing or not a state file.
pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let bad = |why: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        why,
    };
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        bad(format!(
            "no readable {STATE_FILE} ({e}): not a complete checkpoint"
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))
}

/// Removes temporaries left by a run killed while writing a checkpoint.
pub fn remove_partial(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".checkpoint-") {
                tracing::warn!(path = %e.path().display(), "removing a checkpoint that was never completed");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Writes checkpoint `step`: `fill` writes the files into a temporary directory, then
/// the state file goes in last and the directory is renamed to `checkpoint-<step>`
/// (replacing an older one of the same step).
///
/// # Errors
/// `fill`'s errors; I/O errors naming the path.
pub fn write(
    out: &Path,
    state: &TrainerState,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    fill(&tmp)?;
    let state_path = tmp.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).unwrap_or_default() + "\n";
    std::fs::write(&state_path, text).map_err(io(&state_path))?;
    let dst = checkpoint_dir(out, state.step);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    Ok(dst)
}

/// Keeps the newest `keep` checkpoints (0 keeps all), deleting the others.
pub fn prune(out: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let all = list(out);
    if all.len() > keep {
        for (_, dir) in &all[..all.len() - keep] {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(path = %dir.display(), "could not remove an old checkpoint: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            epoch: 0,
            batch_in_epoch: 3,
            noise: 7,
            samples_seen: 12,
            mode: Mode::PixartText,
            trained: vec!["w".into()],
            ema: false,
            tensorbake: "0".into(),
        }
    }

    #[test]
    fn only_complete_checkpoints_count_and_old_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for s in [5, 10, 15] {
            write(out, &state(s), |d| {
                std::fs::write(d.join("model.bin"), b"x").map_err(io(d))
            })
            .unwrap();
        }
        // a killed write: the temporary, and a directory without a state file
        std::fs::create_dir_all(out.join(".checkpoint-20.tmp")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-25")).unwrap();
        let steps: Vec<u64> = list(out).iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [5, 10, 15]);
        assert!(
            read_state(&out.join("checkpoint-25"))
                .unwrap_err()
                .to_string()
                .contains("not a complete checkpoint")
        );
        remove_partial(out);
        assert!(!out.join(".checkpoint-20.tmp").exists());
        prune(out, 2);
        let steps: Vec<u64> = list(out).iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [10, 15]);
        assert_eq!(read_state(&checkpoint_dir(out, 15)).unwrap(), state(15));
        // a failing fill leaves no checkpoint of that step
        let e = write(out, &state(30), |_| Err(TrainError::Config("boom".into())));
        assert!(e.is_err());
        assert!(!checkpoint_dir(out, 30).exists());
    }
}
