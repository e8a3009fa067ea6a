//! The floor of any userspace NFQUEUE gate, for `make bench`: bind queue 0,
//! copy 128 bytes, read the IPv4 header, and answer every packet with the
//! reject mark and NF_REPEAT, one receive and one verdict per packet. Not part
//! of knockq; it runs until killed.

use std::hint::black_box;

use knockq::firewall::REJECT_MARK;

fn main() -> std::io::Result<()> {
    let mut queue = nfq::Queue::open()?;
    queue.bind(0)?;
    queue.set_copy_range(0, 128)?;
    queue.set_queue_max_len(0, 8192)?;
    loop {
        let Ok(mut message) = queue.recv() else {
            continue;
        };
        if let Ok(header) = etherparse::Ipv4HeaderSlice::from_slice(message.get_payload()) {
            black_box(header.source_addr());
        }
        message.set_nfmark(REJECT_MARK);
        message.set_verdict(nfq::Verdict::Repeat);
        queue.verdict(message)?;
    }
}
