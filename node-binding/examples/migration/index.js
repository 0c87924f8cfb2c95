'use strict';
// The example of the npm sticky-cluster module (0.3.5, MIT: its example/index.js, the code its README
// shows with the options from the environment) moved to sticky-cluster-native. Changed: the require
// below, which said require('sticky-cluster'). Added: the socket.io chat where the original left
// "all socket.io stuff goes here" commented out. Everything else is the original's.
var sticky = require('sticky-cluster-native');

function startFn (callback) {
  var async = require('async');
  async.waterfall(
    [

      // connect to remote services

        function (callback) {
          async.parallel(
            [
              // fake db 1
              function (callback) { setTimeout(callback, 2000); },

              // fake db 2
              function (callback) { setTimeout(callback, 1000); }
            ],
            callback
          );
        },

      // configure the worker

        function (services, callback) {
          var http = require('http');
          var app = require('express')();
          var server = http.createServer(app);

          // get remote services
          //var fakedb1 = services[0];
          //var fakedb2 = services[1];

          // all express-related stuff goes here, e.g.
          app.use(function (req, res) { res.end('Handled by PID = ' + process.pid); });

          // all socket.io stuff goes here
          var io = require('socket.io')(server);
          // Added: a chat. Every message goes to every client of this worker, with the worker's pid.
          io.on('connection', function (socket) {
            socket.on('chat', function (text) {
              io.emit('chat', { text: String(text).slice(0, 500), pid: process.pid });
            });
          });

          // don't do server.listen(...)!
          // just pass the server instance to the final async's callback
          callback(null, server);
        }

    ],
    function (err, server) {

      // fail on error
      if (err) { console.log(err); process.exit(1); }

      // pass server instance to sticky-cluster
      else callback(server);
    }
  );
}

sticky(startFn, {
  concurrency: parseInt(process.env.WEB_CONCURRENCY, 10),
  port: parseInt(process.env.PORT, 10),
  debug: (process.env.NODE_ENV === 'development')
});
