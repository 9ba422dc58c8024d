// Build one JavaScript handler into a component:
//
//   WASMSUB_COMPONENTIZE_JS=DIR/node_modules node guests/js/build.mjs SOURCE.js WIT_DIR OUT.wasm
//
// Run by scripts/build-polyglot-guests.sh (from the clone's root, so stack
// traces name SOURCE.js by its path in the clone), which installs the pinned
// componentize-js into DIR outside the clone. ES modules ignore NODE_PATH, so
// componentize-js is imported by its path. The `jco componentize` command
// fails here ("failed to get path metadata (os error 44)"); the library call
// works (/work/shared/guest-toolchain.md).
import { writeFile } from 'node:fs/promises';
import { resolve, join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [source, witDir, output] = process.argv.slice(2);
if (!source || !witDir || !output) {
    console.error('usage: node build.mjs SOURCE.js WIT_DIR OUT.wasm');
    process.exit(2);
}
const modules = process.env.WASMSUB_COMPONENTIZE_JS;
if (!modules) {
    console.error('build.mjs: set WASMSUB_COMPONENTIZE_JS to the node_modules holding @bytecodealliance/componentize-js');
    process.exit(2);
}
const entry = join(modules, '@bytecodealliance', 'componentize-js', 'src', 'componentize.js');
const { componentize } = await import(pathToFileURL(entry).href);

const { component } = await componentize({
    sourcePath: resolve(source),
    witPath: resolve(witDir),
    worldName: 'handler',
    // The handler world imports no wasi:http: without these two the engine's
    // fetch support would add wasi:http imports the host does not link.
    // stdio stays on, so an uncaught error reaches stderr (the trap reason).
    disableFeatures: ['http', 'fetch-event'],
});
await writeFile(output, component);
