//! `deploy/ray/launch.py` on a real Ray: a local head on loopback (pip `ray`, from
//! `scripts/requirements-deploy.txt`, installed into the test Python when missing), 3
//! workers, the `tensorbake run` of one killed in the middle of a shard; Ray retries
//! it and the store equals the one-process store. Then a worker whose shard is gone
//! upstream exhausts its retries and the merged report names it, and a cluster
//! without the GPUs a worker asks for is refused before anything runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tensorbake_kit::http::Fault;

use crate::run::{ok, served_job};
use crate::util::{assert_same_store, deploy_python, root, tempdir, tensorbake};

/// A local Ray head (`ray start --head --block`) with its own temp dir; stopped, and
/// every process of its session killed by pid, when dropped.
struct RayHead {
    child: Child,
    temp: PathBuf,
    address: String,
}

impl RayHead {
    fn start(python: &Path, temp: &Path) -> RayHead {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::create_dir_all(temp).unwrap();
        let log = std::fs::File::create(temp.join("head.log")).unwrap();
        let child = Command::new(python)
            .args(["-m", "ray.scripts.scripts", "start", "--head", "--block"])
            .arg(format!("--port={port}"))
            .args([
                "--node-ip-address=127.0.0.1",
                "--num-cpus=3",
                "--num-gpus=0",
            ])
            .args(["--include-dashboard=false", "--disable-usage-stats"])
            .arg(format!("--temp-dir={}", temp.display()))
            .env("RAY_USAGE_STATS_ENABLED", "0")
            .current_dir(temp)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ray");
        let mut head = RayHead {
            child,
            temp: temp.to_path_buf(),
            address: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let log = std::fs::read_to_string(temp.join("head.log")).unwrap_or_default();
            if log.contains("Ray runtime started") {
                break;
            }
            let gone = head.child.try_wait().unwrap();
            assert!(
                gone.is_none() && Instant::now() < deadline,
                "the Ray head did not start ({gone:?}):\n{log}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        head
    }

    /// Processes whose command line names this head's temp dir (its session).
    fn session_pids(&self) -> Vec<u32> {
        let needle = self.temp.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for RayHead {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.session_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// `python deploy/ray/launch.py args...` in `cwd`, started (not waited for).
fn launch(python: &Path, cwd: &Path, args: &[&str]) -> Child {
    Command::new(python)
        .arg(root().join("deploy/ray/launch.py"))
        .args(args)
        .current_dir(cwd)
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start launch.py")
}

fn finish(child: Child) -> (Option<i32>, serde_json::Value, String) {
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the merged report ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    (o.status.code(), report, stderr)
}

#[test]
fn ray_workers_retry_a_killed_run_and_write_the_one_process_store() {
    let Some(python) = deploy_python("ray_workers_retry_a_killed_run", &["ray"]) else {
        return;
    };
    let dir = tempdir();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // preflight off: its probe would take the stall injected below
    let (manifest, layout, server) = served_job(&work, 6, 3, "[run]\npreflight = false\n");
    let m = manifest.to_str().unwrap();
    let single = ok(&tensorbake(&work, &["run", m, "--output", "single"]));
    assert_eq!(single["shards"]["committed"], 6);

    let head = RayHead::start(&python, &dir.path().join("ray"));
    let bin = env!("CARGO_BIN_EXE_tensorbake");
    let runs = work.join("runs");
    let common = [
        "--address",
        head.address.as_str(),
        "--bin",
        bin,
        "--gpus-per-worker",
        "0",
        "--cpus-per-worker",
        "1",
    ];

    // a worker asking for more than the cluster has is refused up front
    let mut args = vec![m, "--workers", "3"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&["--gpus-per-worker", "1"]);
    let o = launch(&python, &work, &args).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("asks for 1 GPU (--gpus-per-worker) but the cluster has 0"),
        "{stderr}"
    );
    assert!(!work.join("ray-store").exists());

    // shard 1 (rank 1's) stalls halfway; its tensorbake run is killed there
    let half = std::fs::metadata(&layout.shards[1]).unwrap().len() / 2;
    server.inject(
        "shard-000001.tar",
        Fault::StallAfter(half, Duration::from_secs(600)),
        1,
    );
    let mut args = vec![
        m,
        "--workers",
        "3",
        "--output",
        "ray-store",
        "--run-dir",
        runs.to_str().unwrap(),
    ];
    args.extend_from_slice(&common);
    let child = launch(&python, &work, &args);
    let pid_file = runs.join("rank-1.attempt-0.pid");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(pid_file.is_file()
        && server
            .stats()
            .faults
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1)
    {
        assert!(
            Instant::now() < deadline,
            "rank 1 never reached the stalled shard:\n{}",
            std::fs::read_to_string(dir.path().join("ray/head.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let killed = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(killed.success());
    let (code, report, stderr) = finish(child);
    assert_eq!(code, Some(0), "{report:#}\n{stderr}");
    assert_eq!(report["ok"], true);
    let workers = report["workers"].as_array().unwrap();
    let attempts: Vec<u64> = workers
        .iter()
        .map(|w| w["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2, 1], "{report:#}");
    // the killed attempt's log is there, and the retry's
    assert!(runs.join("rank-1.attempt-1.log").is_file());
    assert!(
        stderr.contains("rank 1 done after 2 attempt(s)"),
        "{stderr}"
    );
    // two shards each; rank 1's retry may find one committed by the killed attempt
    for w in workers {
        let parts =
            w["parts_committed"].as_u64().unwrap() + w["already_committed"].as_u64().unwrap();
        assert_eq!(parts, 2, "{w:#}");
        assert_eq!(w["failed_shards"].as_array().unwrap().len(), 0);
    }
    assert!(report["total"]["parts_committed"].as_u64().unwrap() >= 5);
    assert_same_store(
        &work.join("single"),
        &work.join("ray-store"),
        &["committed_at"],
    );

    // shard 2 is gone upstream: rank 2 fails twice (one retry) and is reported so
    std::fs::remove_file(&layout.shards[2]).unwrap();
    let mut args = vec![m, "--workers", "3", "--output", "broken", "--retries", "1"];
    args.extend_from_slice(&common);
    let (code, report, stderr) = finish(launch(&python, &work, &args));
    assert_eq!(code, Some(1), "{report:#}\n{stderr}");
    assert_eq!(report["ok"], false);
    let w2 = &report["workers"][2];
    assert_eq!(w2["ok"], false, "{report:#}");
    assert_eq!(w2["attempts"], 2);
    assert_eq!(w2["failed_shards"], serde_json::json!(["shard-000002.tar"]));
    assert!(w2["error"].as_str().unwrap().contains("exit 1"), "{w2:#}");
    assert_eq!(report["workers"][0]["ok"], true);
    assert_eq!(report["total"]["failed_shards"], 1);
    assert!(stderr.contains("run the same command again"), "{stderr}");
    drop(head);
}
