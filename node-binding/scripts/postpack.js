'use strict';
// Runs after `npm pack` / `npm publish`: removes the vendor/ copy that scripts/prepack.js made.

const fs = require('fs');
const path = require('path');

fs.rmSync(path.join(__dirname, '..', 'vendor'), { recursive: true, force: true });
