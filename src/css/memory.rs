//! How a channel reaches storage.
//!
//! The real channel reads and writes absolute storage with no IOMMU. The emulated channel
//! goes through this trait instead, so each run decides what "storage" is: guest memory
//! (the reference run of a guest program) or a translated program's arena plus exactly the
//! pages the translator pinned for it (anything else is refused).

use thiserror::Error;

/// Why the channel could not access storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AccessFault {
    /// The address is not available to this channel program (unmapped or not pinned):
    /// the channel reports a program check.
    #[error("address {0:#x} is not accessible to the channel program")]
    Addressing(u64),
    /// The storage key forbids the access: the channel reports a protection check.
    #[error("storage key forbids access to {0:#x}")]
    Protection(u64),
}

/// Storage as one channel program sees it.
///
/// `key` is the subchannel key from the ORB: key 0 matches every storage key; any other key
/// must equal the page's storage key to store, and to fetch from a fetch-protected page.
/// Implementations check the whole range before moving any byte, so a fault transfers nothing.
pub trait ChannelMemory {
    /// Fetches `buf.len()` bytes starting at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8], key: u8) -> Result<(), AccessFault>;
    /// Stores `data` starting at `addr`.
    fn write(&self, addr: u64, data: &[u8], key: u8) -> Result<(), AccessFault>;

    /// Storage the channel may fetch CCWs, IDAWs and MIDAWs from without a call per fetch
    /// (a translated program's own image): the address of its first byte and its bytes. A
    /// fetch wholly inside it must read exactly these bytes whatever the key, as
    /// [`Self::read`] would. `None` (the default): every fetch goes through `read`.
    fn program_image(&self) -> Option<(u64, &[u8])> {
        None
    }
}
