//! A rack with a network (DESIGN §13): every Nexus and every sled agent in a
//! Linux network namespace of its own, with its own address, joined by veth
//! pairs to one bridge; each link can be limited and cut:
//! - rate: `tc` tbf on both ends of the host's veth pair;
//! - loss: an nftables rule in the host's namespace dropping that share of
//!   packets in each direction (netem would do, but some kernels, this
//!   project's CI among them, are built without it);
//! - delay: `tc` netem, where the kernel has it; elsewhere `--link-delay-ms`
//!   is refused with a message saying so.
//!
//! Layout, for a run whose id is `<id>` (run-all's pid):
//! - bridge `rk<id>br` in the initial namespace, address `10.<a>.<b>.1/24`
//!   (a and b from the id): the operator's and the database's side;
//! - per host `<name>` (`n0`, `s3`, ...): namespace `rk<id>-<name>`, with
//!   `eth0` at `10.<a>.<b>.<n>/24` and loopback; the other end of the veth
//!   pair, `rk<id><name>`, is a port of the bridge.
//!
//! Nothing is routed beyond the subnet: the namespaces have no default
//! route, and only addresses the run created are used. PostgreSQL (on
//! loopback in the initial namespace) is reached from the namespaces
//! through a small TCP relay on the bridge address.
//!
//! Cleanup: dropping the [`Network`] deletes the namespaces (which takes
//! their veths along) and the bridge. A run killed with SIGKILL leaves them;
//! the next run reaps every `rk<pid>...` whose pid is gone ([`reap`]).
//! Processes inside a namespace are killed before it is deleted.

use anyhow::{Context, bail};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

const PREFIX: &str = "rk";
const NETNS_DIR: &str = "/var/run/netns";

/// Limits applied to one host's link, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkLimits {
    pub mbit: Option<u32>,
    pub delay_ms: Option<u32>,
    pub loss_pct: Option<f32>,
}

pub struct Host {
    pub name: String,
    pub address: Ipv4Addr,
    namespace: String,
    bridge_port: String,
}

pub struct Network {
    pub id: u32,
    bridge: String,
    pub gateway: Ipv4Addr,
    hosts: Vec<Host>,
    relays: Vec<tokio::task::JoinHandle<()>>,
}

/// Whether this process may create namespaces (root, or CAP_NET_ADMIN).
pub fn check_permission() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    if effective & CAP_NET_ADMIN == 0 || effective & CAP_SYS_ADMIN == 0 {
        bail!(
            "--netns needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): it creates network namespaces, veth pairs \
             and a bridge; run it as root or without --netns"
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !output.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn in_namespace(namespace: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", namespace, program];
    full.extend_from_slice(args);
    ip(&full)
}

impl Network {
    /// Creates the bridge for a run with this id (reaping what dead runs
    /// left first).
    pub fn create(id: u32) -> anyhow::Result<Network> {
        check_permission()?;
        reap();
        let gateway = Ipv4Addr::new(10, 100 + (id >> 8 & 0x7f) as u8, (id & 0xff) as u8, 1);
        let bridge = format!("{PREFIX}{id}br");
        // An explicit address: a bridge without one takes the lowest of
        // its ports' addresses, so adding a host could change it under the
        // hosts already running. Their cached neighbour entry then points
        // at a port, frames to it are dropped, and TCP to the gateway (the
        // database relay) stalls until the entry expires: Nexus lost its
        // database for up to a minute while the sleds were being added.
        let address = format!("02:72:6b:{:02x}:{:02x}:01", gateway.octets()[1], gateway.octets()[2]);
        ip(&["link", "add", &bridge, "address", &address, "type", "bridge"])?;
        let network = Network { id, bridge: bridge.clone(), gateway, hosts: Vec::new(), relays: Vec::new() };
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(network)
    }

    /// A new host on the bridge, with its own namespace and address.
    pub fn add_host(&mut self, name: &str, limits: LinkLimits) -> anyhow::Result<&Host> {
        let index = self.hosts.len() as u8 + 10;
        let [a, b, c, _] = self.gateway.octets();
        let address = Ipv4Addr::new(a, b, c, index);
        let namespace = format!("{PREFIX}{}-{name}", self.id);
        let bridge_port = format!("{PREFIX}{}{name}", self.id);
        ip(&["netns", "add", &namespace])?;
        let host = Host { name: name.to_string(), address, namespace, bridge_port };
        self.hosts.push(host);
        let host = self.hosts.last().expect("just pushed");
        ip(&[
            "link",
            "add",
            &host.bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.namespace,
        ])?;
        ip(&["link", "set", &host.bridge_port, "master", &self.bridge])?;
        ip(&["link", "set", &host.bridge_port, "up"])?;
        in_namespace(&host.namespace, "ip", &["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        in_namespace(&host.namespace, "ip", &["link", "set", "eth0", "up"])?;
        in_namespace(&host.namespace, "ip", &["link", "set", "lo", "up"])?;
        let host = self.hosts.last().expect("just pushed");
        host.limit(limits)?;
        Ok(host)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Relays TCP connections to `gateway:port` (reachable from every host)
    /// to `target` in the initial namespace, e.g. PostgreSQL on loopback.
    pub async fn relay(&mut self, port: u16, target: std::net::SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind((self.gateway, port))
            .await
            .with_context(|| format!("listening on {}:{port}", self.gateway))?;
        self.relays.push(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
        Ok(())
    }
}

impl Host {
    /// A host of a running rack, from what its discovery file says.
    pub fn existing(run_id: u32, name: &str, address: Ipv4Addr) -> Host {
        Host {
            name: name.to_string(),
            address,
            namespace: format!("{PREFIX}{run_id}-{name}"),
            bridge_port: format!("{PREFIX}{run_id}{name}"),
        }
    }

    /// Drops everything between this host and `peer` (both directions),
    /// or lets it through again: a partition of two hosts.
    pub fn cut_from(&self, peer: Ipv4Addr, cut: bool) -> anyhow::Result<()> {
        let table = "partition";
        if !cut {
            let _ = in_namespace(&self.namespace, "nft", &["delete", "table", "inet", table]);
            return Ok(());
        }
        let _ = in_namespace(&self.namespace, "nft", &["add", "table", "inet", table]);
        for (chain, hook, field) in [("in", "input", "saddr"), ("out", "output", "daddr")] {
            let spec = format!("{{ type filter hook {hook} priority -10 ; }}");
            let _ = in_namespace(&self.namespace, "nft", &["add", "chain", "inet", table, chain, &spec]);
            let peer = peer.to_string();
            in_namespace(
                &self.namespace,
                "nft",
                &["add", "rule", "inet", table, chain, "ip", field, &peer, "drop"],
            )?;
        }
        Ok(())
    }

    /// Opens the namespace, for a child to enter with `setns` before exec.
    pub fn namespace_fd(&self) -> anyhow::Result<OwnedFd> {
        let path = format!("{NETNS_DIR}/{}", self.namespace);
        Ok(std::fs::File::open(&path).with_context(|| format!("opening {path}"))?.into())
    }

    /// Sets this host's link limits, in both directions (the host's `eth0`
    /// sends, the bridge port sends towards the host).
    pub fn limit(&self, limits: LinkLimits) -> anyhow::Result<()> {
        for (namespace, device) in
            [(Some(self.namespace.as_str()), "eth0"), (None, self.bridge_port.as_str())]
        {
            let tc = |args: &[&str]| match namespace {
                Some(namespace) => in_namespace(namespace, "tc", args),
                None => run("tc", args),
            };
            let _ = tc(&["qdisc", "del", "dev", device, "root"]);
            let parent = match limits.delay_ms {
                Some(delay) => {
                    let delay = format!("{delay}ms");
                    tc(&[
                        "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", "delay", &delay,
                        "limit", "10000",
                    ])
                    .context("link delay needs the netem qdisc (sch_netem), which this kernel lacks")?;
                    vec!["parent", "1:"]
                }
                None => vec!["root"],
            };
            if let Some(mbit) = limits.mbit {
                let rate = format!("{mbit}mbit");
                // A burst of at least 16 KiB and ~10 ms of traffic at the rate.
                let burst = format!("{}", (u64::from(mbit) * 1_000_000 / 8 / 100).max(16 * 1024));
                let mut args: Vec<&str> = vec!["qdisc", "add", "dev", device];
                args.extend(&parent);
                args.extend(["handle", "2:", "tbf", "rate", &rate, "burst", &burst, "latency", "400ms"]);
                tc(&args)?;
            }
        }
        let _ = in_namespace(&self.namespace, "nft", &["delete", "table", "inet", "rack"]);
        if let Some(loss) = limits.loss_pct.filter(|&loss| loss > 0.0) {
            // Out of 10,000 per packet, in both directions.
            let threshold = ((loss * 100.0).round() as u32).min(10_000);
            let rule = format!("numgen random mod 10000 < {threshold} drop");
            in_namespace(&self.namespace, "nft", &["add", "table", "inet", "rack"])
                .context("link loss needs nftables (nft)")?;
            for (chain, hook) in [("in", "input"), ("out", "output")] {
                let spec = format!("{{ type filter hook {hook} priority 0 ; }}");
                in_namespace(&self.namespace, "nft", &["add", "chain", "inet", "rack", chain, &spec])?;
                let mut args = vec!["add", "rule", "inet", "rack", chain];
                args.extend(rule.split(' '));
                in_namespace(&self.namespace, "nft", &args)?;
            }
        }
        Ok(())
    }

    /// Bytes the host has sent over its link (what its bridge port
    /// received), headers included.
    pub fn sent_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/rx_bytes", self.bridge_port);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.trim().parse().with_context(|| format!("parsing {path}: {text:?}"))
    }

    /// Takes the host's link down (it reaches nobody) or up again.
    pub fn set_link(&self, up: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &self.bridge_port, if up { "up" } else { "down" }])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for relay in &self.relays {
            relay.abort();
        }
        for host in &self.hosts {
            remove_namespace(&host.namespace);
            // The kernel frees a deleted namespace, and the veth end in it,
            // only once its last process has exited, and then in the
            // background; deleting our end takes the pair now.
            let _ = ip(&["link", "del", &host.bridge_port]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Kills what runs in a namespace, then deletes it (its veth end goes with
/// it, and so does the pair).
fn remove_namespace(namespace: &str) {
    if let Ok(output) = std::process::Command::new("ip").args(["netns", "pids", namespace]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = ip(&["netns", "del", namespace]);
}

/// Deletes the namespaces, bridges and veths of runs whose process is gone.
pub fn reap() {
    let dead =
        |name: &str| run_id(name).is_some_and(|id| !std::path::Path::new(&format!("/proc/{id}")).exists());
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                remove_namespace(&name);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["link", "del", &name]);
            }
        }
    }
}

/// The run id in a name this module made: `rk<id>` then anything not a
/// digit (`rk<id>br`, `rk<id>-s3`, `rk<id>s3`).
fn run_id(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let suffix = &rest[digits.len()..];
    if digits.is_empty() || suffix.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// Makes a child enter `namespace` before it execs. The fd must stay open
/// until the child is spawned.
pub fn enter_before_exec(command: &mut std::process::Command, namespace: &OwnedFd) {
    use std::os::unix::process::CommandExt;
    let fd = namespace.as_raw_fd();
    // SAFETY: setns(2) is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `rack-dev link ...`: change the links of the rack `run-all --netns`
/// runs (found through its discovery file).
#[derive(clap::Subcommand)]
pub enum LinkCommand {
    /// Each host of the rack and its address.
    List,
    /// Set a host's link limits (replaces the previous ones).
    Set {
        /// "n0" for nexus-0, "s3" for sled-3.
        host: String,
        #[arg(long)]
        mbit: Option<u32>,
        #[arg(long)]
        delay_ms: Option<u32>,
        #[arg(long)]
        loss_pct: Option<f32>,
    },
    /// Take a host's link down: it reaches nobody.
    Down { host: String },
    /// Bring a host's link back up.
    Up { host: String },
    /// Partition two hosts from each other (everything else still flows).
    Cut { host: String, peer: String },
    /// Undo `cut` for a host.
    Mend { host: String },
}

pub fn link(command: LinkCommand) -> anyhow::Result<()> {
    let discovery = common::discovery::RackDiscovery::load()
        .context("no rack is running: start `rack-dev run-all --netns`")?;
    let network =
        discovery.network.context("the running rack has no network of its own: start it with --netns")?;
    let host = |name: &str| -> anyhow::Result<Host> {
        let address = network.hosts.get(name).with_context(|| {
            let known: Vec<&str> = network.hosts.keys().map(String::as_str).collect();
            format!("the rack has no host {name:?}; its hosts are {}", known.join(", "))
        })?;
        Ok(Host::existing(network.run_id, name, *address))
    };
    match command {
        LinkCommand::List => {
            for (name, address) in &network.hosts {
                println!("{name}\t{address}");
            }
        }
        LinkCommand::Set { host: name, mbit, delay_ms, loss_pct } => {
            host(&name)?.limit(LinkLimits { mbit, delay_ms, loss_pct })?;
        }
        LinkCommand::Down { host: name } => host(&name)?.set_link(false)?,
        LinkCommand::Up { host: name } => host(&name)?.set_link(true)?,
        LinkCommand::Cut { host: name, peer } => host(&name)?.cut_from(host(&peer)?.address, true)?,
        LinkCommand::Mend { host: name } => host(&name)?.cut_from(Ipv4Addr::UNSPECIFIED, false)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_read_back_from_names() {
        for (name, id) in [("rk1234-s3", Some(1234)), ("rk1234br", Some(1234)), ("rk1234n0", Some(1234))] {
            assert_eq!(run_id(name), id, "{name}");
        }
        for other in ["rkx-s3", "eth0", "rk1234", "rk"] {
            assert_eq!(run_id(other), None, "{other}");
        }
    }
}
