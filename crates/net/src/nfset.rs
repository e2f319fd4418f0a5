//! Elements of the slot's `allow_dns` set written over nfnetlink directly (and the slot's
//! conntrack table flushed the same way when the slot is recycled), without running
//! `nft`: a DNS answer for an allowed domain must be granted before the guest sees it, and an
//! `nft` process per answer costs ~20 ms (a fork and exec, libnftables starting and reading
//! the table) against well under a millisecond for one netlink batch. The messages are
//! `netlink-packet-netfilter`'s (the rust-netlink project's, like `rtnetlink`); the socket is
//! opened inside the slot's namespace and keeps it, so it can be used from any thread.

use std::net::Ipv4Addr;
use std::time::Duration;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::sockopt::ReceiveTimeout;
use nix::sys::time::TimeVal;

use crate::firewall::{ALLOW_DNS_SET, SLOT_TABLE};

/// `NFNL_SUBSYS_NFTABLES`: the batch markers name the subsystem the batch is for.
const SUBSYS_NFTABLES: u16 = 10;
/// How long to wait for the kernel's acknowledgements; it answers a batch at once, so this
/// only bounds a wedged socket.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// A netfilter netlink socket bound in one namespace.
#[derive(Debug)]
pub(crate) struct SetWriter {
    socket: Socket,
}

impl SetWriter {
    /// Opens the socket in the calling thread's namespace.
    pub(crate) fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let timeout = TimeVal::new(
            i64::try_from(ACK_TIMEOUT.as_secs()).unwrap_or(1),
            i64::from(ACK_TIMEOUT.subsec_micros()),
        );
        nix::sys::socket::setsockopt(&socket, ReceiveTimeout, &timeout)?;
        Ok(Self { socket })
    }

    /// Puts `(address, seconds)` into the slot's `allow_dns` set, replacing the timeout of any
    /// already there, in one transaction. A plain add leaves an existing element's timeout as
    /// it was, so each is added (to exist), deleted and added with its timeout: the batch
    /// commits as a whole, no packet sees it missing. Blocking (one send, one or a few
    /// receives); `seq` must differ between calls on one socket.
    pub(crate) fn grant(&self, addrs: &[(Ipv4Addr, u32)], seq: u32) -> std::io::Result<()> {
        let plain: Vec<_> = addrs.iter().map(|(a, _)| element(*a, None)).collect();
        let timed: Vec<_> = addrs
            .iter()
            .map(|(a, secs)| element(*a, Some(*secs)))
            .collect();
        let ops = [
            (
                NfTablesMessage::NewSetElement(elements(plain.clone())),
                NLM_F_CREATE,
            ),
            (NfTablesMessage::DeleteSetElement(elements(plain)), 0),
            (
                NfTablesMessage::NewSetElement(elements(timed)),
                NLM_F_CREATE,
            ),
        ];
        let mut wire = Vec::new();
        let base = seq.wrapping_mul(8);
        push(&mut wire, batch(ControlMessage::BatchBegin), base, 0);
        for (i, (op, flags)) in ops.into_iter().enumerate() {
            let msg =
                NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0), op);
            let i = u32::try_from(i).unwrap_or(0);
            push(&mut wire, msg, base + 1 + i, flags | NLM_F_ACK);
        }
        push(&mut wire, batch(ControlMessage::BatchEnd), base + 4, 0);
        self.socket.send(&wire, 0)?;
        self.acks(base + 1..base + 4)
    }

    /// Forgets every connection the namespace's conntrack table holds (a delete naming no
    /// connection flushes the table), so a slot's next guest inherits no "established" flow
    /// of its last one. Blocking; `seq` as for [`SetWriter::grant`].
    pub(crate) fn flush_conntrack(&self, seq: u32) -> std::io::Result<()> {
        let msg = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Delete(Vec::new()),
        );
        let mut wire = Vec::new();
        let seq = seq.wrapping_mul(8);
        push(&mut wire, msg, seq, NLM_F_ACK);
        self.socket.send(&wire, 0)?;
        self.acks(seq..seq + 1)
    }

    /// Reads one answer per message of `seqs` (each asked for an acknowledgement): all
    /// zero, or the first error.
    fn acks(&self, seqs: std::ops::Range<u32>) -> std::io::Result<()> {
        let mut pending: Vec<u32> = seqs.collect();
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        // Bounded: each round either removes an answer or fails (timeout included).
        for _ in 0..16 {
            if pending.is_empty() {
                return Ok(());
            }
            buf.clear();
            self.socket.recv(&mut buf, 0)?;
            let mut at = 0usize;
            while at + 16 <= buf.len() {
                let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
                let len = usize::try_from(len).unwrap_or(0);
                if len < 16 || at + len > buf.len() {
                    break;
                }
                let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..at + len]);
                at += (len + 3) & !3;
                let Ok(msg) = parsed else { continue };
                let seq = msg.header.sequence_number;
                // An answer to an earlier call that gave up waiting is not this call's.
                if let NetlinkPayload::Error(e) = &msg.payload
                    && pending.contains(&seq)
                {
                    if let Some(code) = e.code {
                        return Err(std::io::Error::from_raw_os_error(-code.get()));
                    }
                    pending.retain(|s| *s != seq);
                }
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "nftables did not acknowledge the set update",
            ))
        }
    }
}

fn batch(marker: ControlMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, SUBSYS_NFTABLES),
        marker,
    )
}

fn push(wire: &mut Vec<u8>, msg: NetfilterMessage, seq: u32, flags: u16) {
    use netlink_packet_core::Emitable;
    let mut msg = NetlinkMessage::from(msg);
    msg.header.flags = NLM_F_REQUEST | flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let start = wire.len();
    wire.resize(start + msg.buffer_len(), 0);
    msg.emit(&mut wire[start..]);
}

fn element(addr: Ipv4Addr, secs: Option<u32>) -> ListAttribute<SetElementAttribute> {
    let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(
        addr.octets().to_vec(),
    ))];
    if let Some(secs) = secs {
        // Milliseconds, as the kernel keeps them.
        attrs.push(SetElementAttribute::Timeout(u64::from(secs) * 1000));
    }
    ListAttribute::Element(attrs)
}

fn elements(list: Vec<ListAttribute<SetElementAttribute>>) -> SetElementMessage {
    SetElementMessage {
        attributes: vec![
            SetElementList::Table(SLOT_TABLE.to_owned()),
            SetElementList::Set(ALLOW_DNS_SET.to_owned()),
            SetElementList::Elements(list),
        ],
    }
}
