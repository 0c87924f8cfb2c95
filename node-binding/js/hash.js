'use strict';
// The routing hash of the JavaScript implementation: npm string-hash over `socket.remoteAddress`, the same
// function core/src/hash.rs computes, so a client gets the same worker index from either implementation.

/** npm string-hash: 5381, then h = (h * 33) ^ unit for each UTF-16 unit from the last to the first (uint32). */
function stringHash(text) {
  let hash = 5381;
  for (let i = text.length - 1; i >= 0; i -= 1) {
    // Math.imul is the 32-bit product that string-hash's `*` then `^` truncates to anyway.
    hash = Math.imul(hash, 33) ^ text.charCodeAt(i);
  }
  return hash >>> 0;
}

/** The worker index for a client address text as Node reports it (`::ffff:127.0.0.1`, `::1`). */
function routeIndex(addressText, concurrency) {
  return stringHash(addressText) % concurrency;
}

module.exports = { stringHash, routeIndex };
