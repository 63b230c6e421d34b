//! A private network for a test cluster: one Linux network namespace per node,
//! all joined by a bridge that lives in a namespace of its own, plus one veth
//! into the test's namespace so clients reach every node. Partitions are
//! blackhole routes inside the node namespaces, set on both sides, so packets
//! between cut nodes are dropped in both directions, for new and established
//! connections alike, while the test's clients still reach every node.
//! They cut direct links only: traffic through proxies in the test's
//! namespace (`Setup::proxies`) runs between a node and `root_ip`, never
//! between two node addresses, so it is cut with the proxies instead.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2. Everything is named
//! after the test's process id; `create` first removes what dead test
//! processes left behind, `Drop` removes this lab.

use std::process::Command;

pub struct NetLab {
    tag: String,
    /// First three octets of the lab's /24, e.g. "10.213.7".
    prefix: String,
    nodes: u64,
}

const PORT: u16 = 7001;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes namespaces and the root-side veth of labs whose test process is gone.
fn remove_orphans() {
    for line in ip_out(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("roster-rb") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["link", "del", &format!("rr{pid}")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl NetLab {
    pub fn create(nodes: u64) -> Result<NetLab, String> {
        remove_orphans();
        let pid = std::process::id();
        let tag = format!("roster-rb{pid}");
        let used = ip_out(&["-o", "addr", "show"]);
        let third = (0..64)
            .map(|_| fastrand::u8(1..=254))
            .find(|k| !used.contains(&format!("10.213.{k}.")))
            .ok_or("no free 10.213.x.0/24 subnet")?;
        let lab = NetLab {
            tag,
            prefix: format!("10.213.{third}"),
            nodes,
        };
        lab.build().inspect_err(|_| lab.destroy())?;
        Ok(lab)
    }

    fn build(&self) -> Result<(), String> {
        let hub = self.hub();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for id in 1..=self.nodes {
            let ns = self.ns(id);
            let port = format!("v{id}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.ip(id)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let root = self.root_link();
        ip(&[
            "link", "add", &root, "type", "veth", "peer", "name", "up0", "netns", &hub,
        ])?;
        ip(&["-n", &hub, "link", "set", "up0", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.root_ip()),
            "dev",
            &root,
        ])?;
        ip(&["link", "set", &root, "up"])
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.tag)
    }

    fn root_link(&self) -> String {
        format!("rr{}", std::process::id())
    }

    /// The namespace node `id` runs in.
    pub fn ns(&self, id: u64) -> String {
        format!("{}-{id}", self.tag)
    }

    pub fn ip(&self, id: u64) -> String {
        format!("{}.{id}", self.prefix)
    }

    /// The test's own address in the lab (its veth end, on the nodes' /24, so
    /// every node reaches it without a route of its own): where proxies
    /// listen that the nodes dial.
    pub fn root_ip(&self) -> String {
        format!("{}.254", self.prefix)
    }

    /// host:port node `id` serves on (every node uses the same port in its own namespace).
    pub fn addr(&self, id: u64) -> String {
        format!("{}:{PORT}", self.ip(id))
    }

    /// Cuts every node of `a` off every node of `b`, both directions.
    pub fn partition(&self, a: &[u64], b: &[u64]) -> Result<(), String> {
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    ip(&[
                        "-n",
                        &self.ns(from),
                        "route",
                        "replace",
                        "blackhole",
                        &format!("{}/32", self.ip(to)),
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), String> {
        for id in 1..=self.nodes {
            let ns = self.ns(id);
            // Lines read "blackhole 10.213.7.2".
            for line in ip_out(&["-n", &ns, "route", "show", "type", "blackhole"]).lines() {
                if let Some(dst) = line.split_whitespace().nth(1) {
                    ip(&["-n", &ns, "route", "del", "blackhole", dst])?;
                }
            }
        }
        Ok(())
    }

    fn destroy(&self) {
        let _ = ip(&["link", "del", &self.root_link()]);
        for id in 1..=self.nodes {
            let _ = ip(&["netns", "del", &self.ns(id)]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.destroy();
    }
}
