//! `deploy/slurm/run.sbatch` on a real, single-node Slurm: Debian's munged, slurmctld
//! and slurmd, installed by the test when missing (apt, as root) and started on
//! loopback with their configuration, state and logs in a temporary directory (a fake
//! 8-GPU node: `--gres=gpu:1` is scheduled as on a GPU cluster). A 3-task array over
//! the shards writes the store one process writes, part for part; then an array with
//! one task cancelled mid-shard, submitted again, ends in the same store. Every
//! daemon is stopped when the test ends, passing or failing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tensorbake_kit::http::Fault;
use tensorbake_store::{Location, StoreReader};

use crate::metrics::parse_metrics;
use crate::run::{ok, served_job};
use crate::util::{assert_same_store, root, tempdir, tensorbake};

/// Why the machine cannot run Slurm at all (the only reason to skip).
fn cannot_run_slurm() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some(
            "not root: slurmd runs jobs as their user and apt installs need root \
             (run scripts/test.sh as root, e.g. in the CI container)"
                .into(),
        );
    }
    if which("slurmctld").is_none() && which("apt-get").is_none() {
        return Some("Slurm is not installed and there is no apt-get to install it".into());
    }
    None
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// Installs Debian's Slurm and munge when a daemon or client is missing.
fn install_slurm() {
    let missing: Vec<&str> = [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "squeue",
        "scancel",
    ]
    .into_iter()
    .filter(|c| which(c).is_none())
    .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!("slurm test: installing slurmctld slurmd munge slurm-client (missing: {missing:?})");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run apt-get")
    };
    let pkgs = [
        "install",
        "-y",
        "--no-install-recommends",
        "slurmctld",
        "slurmd",
        "munge",
        "slurm-client",
    ];
    if !apt(&pkgs).status.success() {
        let update = apt(&["update"]);
        assert!(
            update.status.success(),
            "apt-get update failed: {}",
            String::from_utf8_lossy(&update.stderr)
        );
        let o = apt(&pkgs);
        assert!(
            o.status.success(),
            "apt-get install slurm failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running single-node cluster; stops its jobs and daemons when dropped.
struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
    jobs: Vec<String>,
}

impl Slurm {
    /// Writes the configuration into `dir` and starts munged, slurmctld and slurmd.
    fn start(dir: &Path) -> Slurm {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let d = dir.display();
        let key = dir.join("munge.key");
        let o = Command::new(which("mungekey").unwrap())
            .arg("--create")
            .arg(format!("--keyfile={}", key.display()))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mungekey: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // eight GPUs as character devices (the driver is not needed to schedule them)
        for i in 0..8 {
            let dev = dir.join(format!("gpu{i}"));
            let made = Command::new("mknod")
                .arg(&dev)
                .args(["c", "1", "3"])
                .status();
            if !made.is_ok_and(|s| s.success()) {
                std::fs::write(&dev, b"").unwrap();
            }
        }
        std::fs::write(
            dir.join("gres.conf"),
            format!("NodeName=tbnode Name=gpu File={d}/gpu[0-7]\n"),
        )
        .unwrap();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=tensorbake-test\nSlurmctldHost={host}(127.0.0.1)\n\
                 SlurmctldPort={}\nSlurmdPort={}\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={d}/munge.sock\n\
                 SlurmUser=root\nSlurmdUser=root\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 JobCompType=jobcomp/none\nMpiDefault=none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nSchedulerType=sched/builtin\n\
                 ReturnToService=2\nMinJobAge=600\nKillWait=5\n\
                 SlurmdParameters=config_overrides\nGresTypes=gpu\n\
                 NodeName=tbnode NodeAddr=127.0.0.1 NodeHostname={host} CPUs=48 RealMemory=256000 \
                 Gres=gpu:8 State=UNKNOWN\n\
                 PartitionName=test Nodes=tbnode Default=YES MaxTime=INFINITE State=UP\n",
                free_port(),
                free_port(),
            ),
        )
        .unwrap();
        let mut slurm = Slurm {
            dir: dir.to_path_buf(),
            conf,
            daemons: Vec::new(),
            jobs: Vec::new(),
        };
        slurm.spawn(
            "munged",
            Command::new(which("munged").unwrap())
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--socket={d}/munge.sock"))
                .arg(format!("--pid-file={d}/munged.pid"))
                .arg(format!("--seed-file={d}/munged.seed"))
                .arg(format!("--log-file={d}/munged.log")),
        );
        slurm.wait_for("the munge socket", || dir.join("munge.sock").exists());
        let ctld = Command::new(which("slurmctld").unwrap())
            .args(["-D", "-i", "-f"])
            .arg(&slurm.conf)
            .env("SLURM_CONF", &slurm.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("slurmctld.err")).unwrap())
            .spawn()
            .expect("start slurmctld");
        slurm.daemons.push(("slurmctld", ctld));
        slurm.wait_for("slurmctld to answer", || {
            slurm
                .cmd("scontrol")
                .arg("ping")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("is UP"))
        });
        let slurmd = Command::new(which("slurmd").unwrap())
            .args(["-D", "-N", "tbnode", "-f"])
            .arg(&slurm.conf)
            .env("SLURM_CONF", &slurm.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("slurmd.err")).unwrap())
            .spawn()
            .expect("start slurmd");
        slurm.daemons.push(("slurmd", slurmd));
        slurm.wait_for("the node to be idle", || {
            slurm
                .cmd("sinfo")
                .args(["-h", "-n", "tbnode", "-o", "%T"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        });
        slurm
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let err = std::fs::File::create(self.dir.join(format!("{name}.err"))).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// Polls `ready` for up to 60 s; panics with the daemons' logs if it never holds.
    fn wait_for(&self, what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "waiting for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The tails of the daemons' logs (for failure messages).
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in [
            "munged.err",
            "slurmctld.err",
            "slurmctld.log",
            "slurmd.err",
            "slurmd.log",
        ] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!("--- {f}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// A Slurm client command pointed at this cluster.
    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(which(name).unwrap_or_else(|| panic!("{name} not installed")));
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `sbatch args...` from `cwd` with `env`; records the job to cancel at the end.
    fn sbatch(&mut self, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (String, Output) {
        let mut c = self.cmd("sbatch");
        c.arg("--parsable").args(args).current_dir(cwd);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // the job id is the first line, printed at submission (before --wait returns)
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut first,
        )
        .unwrap();
        let id = first
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if !id.is_empty() {
            self.jobs.push(id.clone());
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            !id.is_empty(),
            "sbatch gave no job id: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (id, out)
    }

    /// The array tasks of `job` still queued or running, by task id -> state.
    fn queued(&self, job: &str) -> BTreeMap<String, String> {
        let o = self
            .cmd("squeue")
            .args(["-h", "-r", "-j", job, "-o", "%i %T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(i, s)| (i.to_string(), s.to_string()))
            .collect()
    }

    /// `JobState` of `job_task` (`12_1`) as scontrol knows it.
    fn state(&self, job_task: &str) -> String {
        let o = self
            .cmd("scontrol")
            .args(["show", "job", "-o", job_task])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.split_whitespace()
            .find_map(|f| f.strip_prefix("JobState="))
            .unwrap_or_else(|| panic!("no JobState for {job_task}: {text}"))
            .to_string()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        for job in &self.jobs {
            let _ = self.cmd("scancel").arg(job).output();
        }
        // let slurmd reap the cancelled steps before it goes
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.jobs.iter().any(|j| !self.queued(j).is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for (name, child) in self.daemons.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("slurm test: {name} did not stop on SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The JSON reports the array's tasks wrote, by rank.
fn reports(dir: &Path, job: &str) -> BTreeMap<u64, serde_json::Value> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir.join("reports")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(&format!("{job}_")) {
            let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            out.insert(r["rank"].as_u64().unwrap(), r);
        }
    }
    out
}

/// The Slurm output files of `job` (for failure messages).
fn task_logs(cwd: &Path, job: &str) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(cwd).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(&format!("-{job}_")) && name.ends_with(".out") {
            s.push_str(&format!(
                "--- {name}\n{}",
                std::fs::read_to_string(&p).unwrap()
            ));
        }
    }
    s
}

#[test]
fn a_slurm_array_writes_the_one_process_store_and_a_cancelled_task_is_redone() {
    if let Some(why) = cannot_run_slurm() {
        assert!(
            std::env::var("TENSORBAKE_REQUIRE_ENGINES").as_deref() != Ok("1"),
            "TENSORBAKE_REQUIRE_ENGINES=1 but Slurm cannot run here: {why}"
        );
        eprintln!("SKIP a_slurm_array_writes_the_one_process_store...: {why}");
        return;
    }
    install_slurm();
    let dir = tempdir();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // preflight off: its probe would take the stall injected below
    let (manifest, layout, server) = served_job(&work, 6, 3, "[run]\npreflight = false\n");
    let m = manifest.to_str().unwrap();
    let single = ok(&tensorbake(&work, &["run", m, "--output", "single"]));
    assert_eq!(single["shards"]["committed"], 6);
    let part_of: BTreeMap<String, String> = single["committed_parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["shard"].as_str().unwrap().into(),
                p["part"].as_str().unwrap().into(),
            )
        })
        .collect();

    let mut slurm = Slurm::start(&dir.path().join("slurm"));
    let script = root().join("deploy/slurm/run.sbatch");
    let script = script.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_tensorbake");

    // 1. three tasks, one store
    let runs = work.join("runs-a");
    let env = [
        ("TENSORBAKE_BIN", bin),
        ("TENSORBAKE_OUTPUT", "array"),
        ("TENSORBAKE_RUN_DIR", runs.to_str().unwrap()),
    ];
    let (job, out) = slurm.sbatch(&work, &["--wait", "--array=0-2", script, m], &env);
    assert!(
        out.status.success(),
        "array {job} failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        task_logs(&work, &job),
        slurm.logs()
    );
    assert_same_store(&work.join("single"), &work.join("array"), &["committed_at"]);
    let by_rank = reports(&runs, &job);
    assert_eq!(
        by_rank.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "{}",
        task_logs(&work, &job)
    );
    for (rank, r) in &by_rank {
        assert_eq!(r["rank_from"], "Slurm", "{r:#}");
        assert_eq!(r["world"], 3);
        // shards 0..6 by i % 3: two each
        assert_eq!(r["shards"]["committed"], 2, "rank {rank}: {r:#}");
        // each task's metrics file: its rank, its final numbers
        let prom = runs.join("metrics").join(format!("{job}_{rank}.prom"));
        let text =
            std::fs::read_to_string(&prom).unwrap_or_else(|e| panic!("{}: {e}", prom.display()));
        let metrics = parse_metrics(&text);
        let key = format!("tensorbake_samples_written_total{{run=\"test\",rank=\"{rank}\"}}");
        assert_eq!(
            metrics[&key],
            r["samples"]["written"].as_f64().unwrap(),
            "{text}"
        );
        let fin = format!("tensorbake_run_finished{{run=\"test\",rank=\"{rank}\"}}");
        assert_eq!(metrics[&fin], 1.0);
    }

    // 2. task 1 cancelled in the middle of shard 1 (which stalls), then the array again
    let half = std::fs::metadata(&layout.shards[1]).unwrap().len() / 2;
    server.inject(
        "shard-000001.tar",
        Fault::StallAfter(half, Duration::from_secs(600)),
        1,
    );
    let runs = work.join("runs-b");
    let env = [
        ("TENSORBAKE_BIN", bin),
        ("TENSORBAKE_OUTPUT", "cancelled"),
        ("TENSORBAKE_RUN_DIR", runs.to_str().unwrap()),
    ];
    let (job, out) = slurm.sbatch(&work, &["--array=0-2", script, m], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slurm.wait_for("task 1 to reach the stalled shard", || {
        server
            .stats()
            .faults
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    });
    let task = format!("{job}_1");
    let o = slurm.cmd("scancel").arg(&task).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    slurm.wait_for("the array to end", || slurm.queued(&job).is_empty());
    assert_eq!(
        slurm.state(&task),
        "CANCELLED",
        "{}",
        task_logs(&work, &job)
    );
    for t in ["0", "2"] {
        assert_eq!(
            slurm.state(&format!("{job}_{t}")),
            "COMPLETED",
            "{}",
            task_logs(&work, &job)
        );
    }
    // task 1 wrote no report (it was killed); shard 1's part is not in the store
    assert_eq!(
        reports(&runs, &job).keys().copied().collect::<Vec<_>>(),
        [0, 2]
    );
    let store = work.join("cancelled");
    let partial = StoreReader::open(&Location::from(store.as_path())).unwrap();
    let committed: Vec<String> = partial.parts().into_iter().map(|(name, _)| name).collect();
    assert!(
        !committed.contains(&part_of["shard-000001.tar"]),
        "the cancelled shard was committed: {committed:?}"
    );
    assert!(committed.len() >= 4 && committed.len() < 6, "{committed:?}");

    let (again, out) = slurm.sbatch(&work, &["--wait", "--array=0-2", script, m], &env);
    assert!(
        out.status.success(),
        "rerun {again} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        task_logs(&work, &again)
    );
    let rerun = reports(&runs, &again);
    // ranks 0 and 2 had nothing left; rank 1 redid what the cancel left
    assert_eq!(rerun[&0]["shards"]["todo"], 0, "{:#}", rerun[&0]);
    assert_eq!(rerun[&2]["shards"]["todo"], 0);
    let redone = rerun[&1]["shards"]["committed"].as_u64().unwrap();
    assert_eq!(redone as usize, 6 - committed.len(), "{:#}", rerun[&1]);
    assert_same_store(&work.join("single"), &store, &["committed_at"]);
}
