//! weft-collector: flags in, the data path wired: attach → capture → parse → ship/print.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{error, info, warn};
use weft_collector::{
    alarm::Alarm,
    attach::{
        self, AttachError, Attacher, Backend, Iface,
        links::{self, InterfaceFilter, LinkEvent, LinkWatcher},
        tracefs,
    },
    capture::{Capture, GLOBAL_CAPTURE, pace::ReadPace, ring::RingLayout},
    cli::Cli,
    metrics::{self, Metrics},
    parse::ParseConfig,
    pipeline::Pipeline,
    ship::Shipper,
};

/// The kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-collector-ebpf"));

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists: may unshare the mount namespace.
    match tracefs::ensure() {
        Ok(true) => info!("mounted tracefs in a private mount namespace"),
        Ok(false) => {}
        Err(e) => warn!("tracefs unavailable, the connection tracepoint will fail: {e:#}"),
    }
    // One thread for everything (capture, parse, ship, metrics): the work is one sequential
    // pipeline, and on one thread an Exchange is allocated and freed by the same thread and
    // no task wakes another thread. With two worker threads the collector used about 10 %
    // more CPU when shipping (1,441 against 1,294 ns per request, 3 alternating pairs) and
    // more memory; a second core would only matter far beyond a node's rates.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Spawned rather than run by `block_on` directly: a panic then ends it as an error.
    let outcome = runtime.block_on(async {
        tokio::spawn(run(cli))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the collector's main task failed: {e}")))
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("weft-collector: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Loads the kernel programs, sized for `layout`; with `hooks_only` they capture nothing.
/// The loader holds the kernel's parsed BTF (about 11 MiB here): it must not outlive the
/// load, or the collector carries it for its whole life.
fn load_programs(layout: RingLayout, object: &[u8], hooks_only: bool) -> anyhow::Result<aya::Ebpf> {
    let mut loader = layout.loader();
    if hooks_only {
        loader.override_global(GLOBAL_CAPTURE, &0u8, true);
    }
    loader.load(object).context("loading the eBPF object")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let listener = metrics::bind(cli.metrics_listen).await?;
    info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    tokio::spawn(metrics.clone().serve(listener));

    let filter = InterfaceFilter::new(&cli.interfaces)?;
    let backend = Backend::resolve(cli.tc_backend);
    // Development aid: `WEFT_EBPF_OBJECT=<path>` loads another build of the kernel programs
    // (for example to compare variants in the benchmark) instead of the embedded one.
    let object: std::borrow::Cow<'static, [u8]> = match std::env::var_os("WEFT_EBPF_OBJECT") {
        Some(path) => {
            warn!(path = %path.to_string_lossy(), "loading the kernel programs from a file");
            std::fs::read(&path)
                .context("reading WEFT_EBPF_OBJECT")?
                .into()
        }
        None => EBPF_OBJECT.into(),
    };
    let layout = RingLayout::for_this_machine()?;
    if cli.hooks_only {
        metrics.set_capture(false);
        warn!("--hooks-only: the classifiers are attached but capture nothing");
    }
    let mut ebpf = load_programs(layout, &object, cli.hooks_only)?;
    // Kept open for the collector's lifetime: the kernel times programs while any such fd is.
    let _bpf_stats = match cli.bpf_stats {
        true => Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF run-time statistics (--bpf-stats)")?,
        ),
        false => None,
    };
    let mut capture = Capture::new(&mut ebpf, layout)?;
    info!(
        cpus = layout.cpus,
        fast_slots_per_cpu = layout.fast_slots,
        spill_slots_per_cpu = layout.spill_slots,
        "packet rings ready"
    );

    let (conn, rtnl, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    // Subscribe before listing so that no interface falls between the two.
    let mut watcher = LinkWatcher::subscribe()?;
    let present = links::list(&rtnl).await?;
    let stale = attach::remove_stale(&rtnl, &present).await;
    if stale > 0 {
        info!(
            filters = stale,
            "removed stale filters of an earlier instance"
        );
    }

    let mut attacher = Attacher::new(ebpf, backend, rtnl, metrics.clone())?;
    info!(backend = backend.as_str(), "attaching");
    for iface in present.iter().filter(|i| filter.traces(i)) {
        if let Err(e) = attach_one(&mut attacher, iface).await {
            // A refusal at start is fatal: the operator must fix the configuration first.
            attacher.shutdown().await;
            return Err(e.into());
        }
    }

    let node_name = node_name(&cli);
    let shipper = Shipper::spawn(cli.ship.config(node_name.clone()));
    let mut pipeline = Pipeline::new(
        ParseConfig {
            redact_query: !cli.keep_query,
            ..ParseConfig::default()
        },
        cli.print,
        &node_name,
        shipper.sender(),
        metrics.clone(),
    );
    pipeline.set_interfaces(attacher.ifnames());

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The first tick at once, as tokio's `interval` did: /metrics and the ship info are
    // filled from the start.
    let mut tick = Alarm::at(Instant::now()).context("creating the tick's timerfd")?;
    // The packet rings wake nobody per record: this timer reads them, on the schedule of
    // `pace`, and while it has backed off their doorbells wake the collector for a burst.
    let mut pace = ReadPace::new(cli.max_read_interval);
    metrics.record_read_interval(pace.interval());
    let mut read_timer =
        Alarm::at(Instant::now() + pace.interval()).context("creating the read timerfd")?;
    info!(node = %node_name, "running");
    loop {
        // Each branch only says what happened; the work is done below, where nothing else
        // borrows the pipeline or the attacher.
        let wake = tokio::select! {
            _ = sigterm.recv() => Wake::Stop("SIGTERM"),
            _ = sigint.recv() => Wake::Stop("SIGINT"),
            ev = watcher.next() => Wake::Link(ev),
            res = capture.woken() => { res?; Wake::Read(ReadCause::Kernel) }
            due = read_timer.fired() => Wake::Read(ReadCause::Timer { due: due? }),
            due = tick.fired() => Wake::Tick(due?),
        };
        match wake {
            Wake::Read(cause) => {
                let woke = Instant::now();
                let found = capture.drain_now(|c| pipeline.on_captured(c));
                pipeline.flush_output();
                let next = match cause {
                    ReadCause::Timer { due } => Some(pace.after_read(due, woke, found)),
                    ReadCause::Kernel => pace.after_woken_read(woke, found),
                };
                if let Some(next) = next {
                    read_timer.set(next).context("setting the read timerfd")?;
                    capture.arm_doorbell(pace.backed_off());
                }
                metrics.record_pace(cause.as_str(), pace.interval());
            }
            Wake::Stop(sig) => {
                info!("{sig}: detaching");
                break;
            }
            Wake::Link(Some(ev)) => {
                on_link_event(&mut attacher, &filter, ev).await;
                pipeline.set_interfaces(attacher.ifnames());
            }
            Wake::Link(None) => {
                warn!("the rtnetlink link subscription closed; subscribing again");
                watcher = LinkWatcher::subscribe()?;
            }
            Wake::Tick(due) => {
                // A second after this one was due; at once if the loop is a second late
                // (one tick, not a burst to catch up).
                tick.set(next_tick(due, Instant::now()))
                    .context("setting the tick's timerfd")?;
                pipeline.tick(now_unix_nanos(), &capture, &shipper.stats());
                if cli.bpf_stats {
                    metrics.record_programs(&attacher.program_stats());
                }
                shipper.set_info(pipeline.info(
                    backend.as_str(),
                    attacher.attached_names(),
                    &capture,
                ));
            }
        }
    }
    attacher.shutdown().await;
    // Drain what the kernel still holds, then let the shipper deliver.
    capture.drain_all(|c| pipeline.on_captured(c));
    pipeline.flush_output();
    shipper.shutdown().await;
    info!("stopped");
    Ok(())
}

enum Wake {
    /// Read the rings.
    Read(ReadCause),
    Stop(&'static str),
    Link(Option<LinkEvent>),
    /// The one-second tick (metrics, ship info), due at this time.
    Tick(Instant),
}

/// How often the metrics are refreshed and the shipper's info updated.
const TICK: Duration = Duration::from_secs(1);

/// When the tick after one due at `due` is due, given that the loop handled it at `now`.
fn next_tick(due: Instant, now: Instant) -> Instant {
    (due + TICK).max(now)
}

/// Why the rings are read now (`weft_collector_reads_total{cause}`).
#[derive(Clone, Copy)]
enum ReadCause {
    /// The read schedule (`capture::pace`): the read was due at `due`.
    Timer { due: Instant },
    /// A ring's doorbell, or the connection ring buffer a quarter full.
    Kernel,
}

impl ReadCause {
    fn as_str(self) -> &'static str {
        match self {
            ReadCause::Timer { .. } => "timer",
            ReadCause::Kernel => "kernel",
        }
    }
}

fn node_name(cli: &Cli) -> String {
    cli.node_name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".to_owned())
    })
}

fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Attaches to one interface; only a Cilium refusal is an error (other failures are logged
/// and visible in `/metrics` as state `failed`).
async fn attach_one(attacher: &mut Attacher, iface: &Iface) -> Result<(), AttachError> {
    match attacher.attach(iface).await {
        Ok(()) => Ok(()),
        Err(AttachError::Refused(msg)) => Err(AttachError::Refused(msg)),
        Err(AttachError::Failed(e)) => {
            warn!(interface = %iface.name, "not traced: {e:#}");
            Ok(())
        }
    }
}

async fn on_link_event(attacher: &mut Attacher, filter: &InterfaceFilter, ev: LinkEvent) {
    match ev {
        LinkEvent::Present(iface) if filter.traces(&iface) => {
            if !attacher.is_attached(iface.index)
                && let Err(e) = attach_one(attacher, &iface).await
            {
                error!(interface = %iface.name, "not traced: {e}");
            }
        }
        // Renamed to something we do not trace.
        LinkEvent::Present(iface) => attacher.detach(iface.index, false).await,
        LinkEvent::Gone(index) => attacher.detach(index, true).await,
    }
}
